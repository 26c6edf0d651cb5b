"""Checkpoint figures for `make bench`:
(1) seconds training is blocked per async save vs a synchronous torch.save of the same state, for
    full-width VGG-11 (132.9M parameters) plus its AdamW state, on CPU, in one process;
(2) seconds from `launcher launch` to the first finished step when resuming that model's run vs a
    fresh start (medians of a few pairs)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from jobs.checkpoint import Checkpointer
from jobs.models import build_model
from jobs.schema import CheckpointConfig, ModelConfig, StorageConfig

REPO = Path(__file__).resolve().parent.parent
BIG = ["model.width=1", "model.hidden=4096", "model.pool_size=7", "trainer.micro_batch=4", "trainer.global_batch=4",
       "parallel.procs_per_node=1", "trainer.epochs=null", "logging.progress_bar=false", "trainer.eval_every=0",
       "checkpoint.at_end=true", "checkpoint.keep_last=1", "data.val_fraction=0.01"]


def _state() -> dict:
    model = build_model(ModelConfig(name="vgg", variant="vgg11", num_classes=1000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # materialise AdamW's moments like a real step would
        p.grad = torch.zeros_like(p)
    opt.step()
    params = sum(p.numel() for p in model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "params": params}


def blocked_vs_sync(saves: int = 4) -> dict:
    state = _state()
    params = state.pop("params")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        sync = []
        for i in range(2):
            start = time.perf_counter()
            torch.save(state, Path(tmp) / f"sync{i}.pt")
            sync.append(time.perf_counter() - start)
            os.remove(Path(tmp) / f"sync{i}.pt")
        ckpt = Checkpointer(CheckpointConfig(keep_last=1, queue_size=1), Path(tmp) / "ckpt", None, StorageConfig())
        blocked = []
        for step in range(1, saves + 1):
            start = time.perf_counter()
            ckpt.save(step, state, {})
            blocked.append(time.perf_counter() - start)
            ckpt.flush()  # the next save measures blocking, not waiting for a full queue
        ckpt.close()
        nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    steady = statistics.median(blocked[1:])  # the first save allocates the reusable host buffers
    return {"parameters": params, "model_bytes": nbytes, "sync_torch_save_s": statistics.median(sync),
            "async_blocked_s": steady, "async_blocked_first_s": blocked[0],
            "ratio": steady / statistics.median(sync)}


def _launch_to_first_step(runs: str, name: str, steps: int) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "launcher", "launch", "vgg_pretrain", *BIG, f"trainer.max_steps={steps}",
                    "--runs-dir", runs, "--run-name", name], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads((Path(runs) / name / "first_step.json").read_text())["time"] - start


def resume_vs_fresh(repeats: int = 2) -> dict:
    """Fresh start and resume of the same run, `repeats` times (a new run each time): medians and
    every value, since other processes on a small machine move single launches by seconds."""
    fresh, resumed = [], []
    with tempfile.TemporaryDirectory() as runs:
        for i in range(repeats):
            fresh.append(_launch_to_first_step(runs, f"big{i}", 1))  # also leaves a committed checkpoint at step 1
            resumed.append(_launch_to_first_step(runs, f"big{i}", 2))  # same run name: resumes from step 1
            log = (Path(runs) / f"big{i}" / "logs" / "rank0.log").read_text()
            assert "resumed from" in log, "the second launch did not resume"
    return {"fresh_s_to_first_step": statistics.median(fresh), "resume_s_to_first_step": statistics.median(resumed),
            "fresh_s_all": fresh, "resume_s_all": resumed}


def run() -> dict:
    a, b = blocked_vs_sync(), resume_vs_fresh()
    rows = [
        (f"async save blocked ({a['parameters'] / 1e6:.1f}M params + AdamW)", f"{a['async_blocked_s']:.3f} s",
         f"torch.save {a['sync_torch_save_s']:.3f} s", f"ratio {a['ratio']:.3f} (goal <= 0.1)"),
        ("resume: launch -> first step", f"{b['resume_s_to_first_step']:.2f} s",
         f"fresh start {b['fresh_s_to_first_step']:.2f} s",
         f"ratio {b['resume_s_to_first_step'] / b['fresh_s_to_first_step']:.2f} (goal <= 1.3; median of "
         f"{len(b['resume_s_all'])})"),
    ]
    return {"results": {**a, **b}, "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run()["results"], indent=2))
