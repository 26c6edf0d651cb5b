"""Helper process for the kill test: commits a small checkpoint at step 1, then starts a large
(~200 MB) one at step 2 and prints WRITING as soon as its first file appears on disk, so the test
can SIGKILL it in the middle of the write.

    python tests/ckpt_writer.py LOCAL_DIR [--async]
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `jobs` and `launcher`

from jobs.checkpoint import Checkpointer, step_dir_name  # noqa: E402
from jobs.schema import CheckpointConfig, StorageConfig  # noqa: E402

LARGE_PARAMS = 50_000_000  # fp32: 200 MB


def announce_when_writing(folder: Path) -> None:
    while not any(folder.glob("*.pt")):
        time.sleep(0.001)
    print("WRITING", flush=True)


def main() -> None:
    local_dir = Path(sys.argv[1])
    cfg = CheckpointConfig(async_save="--async" in sys.argv)
    ckpt = Checkpointer(cfg, local_dir, None, StorageConfig())
    ckpt.save(1, {"model": {"w": torch.arange(10.0)}, "trainer": {"step": 1}}, {"loss": 1.0})
    assert ckpt.flush(timeout=30), "step 1 did not commit"
    print("COMMITTED 1", flush=True)
    large = {"model": {"w": torch.ones(LARGE_PARAMS)}, "trainer": {"step": 2}}
    threading.Thread(target=announce_when_writing, args=(local_dir / step_dir_name(2),), daemon=True).start()
    ckpt.save(2, large, {"loss": 0.5})
    ckpt.flush(timeout=60)
    print("COMMITTED 2", flush=True)  # the test kills us before this


if __name__ == "__main__":
    main()
