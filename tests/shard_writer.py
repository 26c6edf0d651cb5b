"""Helper for the sharded-save kill test, run by torchrun on 2 ranks (gloo):

    torchrun --nproc-per-node 2 tests/shard_writer.py save LOCAL_DIR
        commits a small sharded checkpoint at step 1 (prints COMMITTED 1), then starts a large one at
        step 2; rank 1 prints "WRITING <pid>" as soon as its shard file appears, so the test can
        SIGKILL it in the middle of the save.
    torchrun --nproc-per-node 2 tests/shard_writer.py fail LOCAL_DIR
        rank 1 cannot write its shard of step 2 (a directory sits where its file goes): prints
        "FLUSHED <flush result> LATEST <newest committed step>" after step 2 and again after step 3.
    torchrun --nproc-per-node 2 tests/shard_writer.py resume LOCAL_DIR
        what the next launch does: finds the newest committed checkpoint on rank 0, loads every
        rank's shard from it, and prints "RESUMED <step> <rank> <value>" per rank.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `jobs`

from jobs.checkpoint import Checkpointer, step_dir_name  # noqa: E402
from jobs.checkpoint.sharded import load_shards  # noqa: E402
from jobs.schema import CheckpointConfig, StorageConfig  # noqa: E402

LARGE = 40_000_000  # fp32 per rank: 160 MB, long enough a write to be killed in


def shards(rank: int, step: int, numel: int) -> dict:
    return {"model": {f"w{rank}": torch.full((numel,), float(10 * step + rank))}}


def announce_when_writing(folder: Path) -> None:
    while not (folder / "__1_0.distcp").exists():
        time.sleep(0.001)
    print(f"WRITING {os.getpid()}", flush=True)


def main() -> None:
    mode, local_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt = Checkpointer(CheckpointConfig(async_save=True), local_dir, None, StorageConfig(), is_writer=rank == 0,
                        sharded=True)
    if mode == "save":
        ckpt.save(1, {"trainer": {"step": 1}}, {"loss": 1.0}, shards=shards(rank, 1, 1000))
        assert ckpt.flush(timeout=60), "step 1 did not commit"
        dist.barrier()
        if rank == 0:
            print("COMMITTED 1", flush=True)
        if rank == 1:
            threading.Thread(target=announce_when_writing, args=(local_dir / step_dir_name(2),), daemon=True).start()
        ckpt.save(2, {"trainer": {"step": 2}}, {"loss": 0.5}, shards=shards(rank, 2, LARGE))
        ckpt.flush(timeout=120)
    elif mode == "fail":
        (local_dir / step_dir_name(2) / "__1_0.distcp").mkdir(parents=True, exist_ok=True)
        for step in (2, 3):
            ckpt.save(step, {"trainer": {"step": step}}, {"loss": 1.0}, shards=shards(rank, step, 1000))
            flushed = ckpt.flush(timeout=60)
            if rank == 0:
                print(f"FLUSHED {flushed} LATEST {ckpt.latest()}", flush=True)
    else:
        found = [None, None]
        if rank == 0:
            loaded = ckpt.load_latest()
            found = [loaded[0], loaded[1]["trainer"]["step"]] if loaded else [None, None]
        dist.broadcast_object_list(found, src=0)
        template = {"model": {f"w{rank}": torch.empty(1000)}}
        load_shards(found[0], template)
        print(f"RESUMED {found[1]} {rank} {template['model'][f'w{rank}'][0].item()}", flush=True)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
