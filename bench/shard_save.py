"""Training time blocked per sharded async save vs a synchronous DCP save of the same state, 2 FSDP ranks.

    torchrun --standalone --nproc-per-node 2 -m bench.shard_save [--small]

A GPT of >= 50M parameters is sharded with FSDP over 2 ranks and trained one AdamW step (so the
optimizer's moments exist). Then SAVES rounds, each of two saves of the same step's state into a fresh
folder under /tmp (removed at the end), the reference first:
- reference: `torch.distributed.checkpoint.save(state, checkpoint_id=folder)` on the training thread,
  where `state` is this rank's shard of the model and optimizer (built beforehand, not timed);
- ours: on the training thread, building that shard state (jobs.parallel.state.model_shard and
  optimizer_shard: get_model_state_dict and get_optimizer_state_dict with the flatten option, as the
  trainer does) and `Checkpointer(..., sharded=True).save(step, small_state, metrics, shards=state)`,
  which returns once the shard is copied to host memory (jobs/checkpoint/shard_staging.py, on
  copy_threads_per_rank threads: this machine's CPUs over its ranks). Then, outside the timed part,
  flush() waits for the background write, the confirmations and rank 0's commit: that wait is the
  time to commit.
Each figure is the maximum over the ranks (training waits for its slowest rank at the next
collective), and the median over rounds 2..SAVES: the first of ours allocates the host buffers that
later saves reuse (it is reported apart). Both write the same bytes to the same disk, and both fsync.
Rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from jobs.checkpoint import Checkpointer
from jobs.checkpoint.shard_staging import copy_threads
from jobs.env import RankEnv
from jobs.gpt import gpt, lm_loss
from jobs.parallel import init_distributed, parallelize
from jobs.parallel.state import model_shard, optimizer_shard
from jobs.schema import CheckpointConfig, ParallelConfig, StorageConfig

MODEL = {"vocab": 256, "seq_len": 64, "dim": 768, "layers": 8, "heads": 12, "tied_embeddings": False}  # 57M
SMALL = {"vocab": 256, "seq_len": 32, "dim": 64, "layers": 2, "heads": 2, "tied_embeddings": False}
SAVES = 5


def trained_model(env: RankEnv, model_kwargs: dict) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """The FSDP model after one AdamW step, its optimizer, and its parameter count."""
    torch.manual_seed(0)
    model = gpt(**model_kwargs)
    params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, ParallelConfig(strategy="fsdp", procs_per_node=env.world_size), env,
                        torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_kwargs["vocab"], (2, model_kwargs["seq_len"] + 1),
                      generator=torch.Generator().manual_seed(env.rank))
    lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, params


def shard_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What Trainer.shard_state() gives a sharded save on an FSDP rank."""
    return {"model": model_shard(model), "optimizer": optimizer_shard(model, opt)}


def slowest(seconds: float) -> float:
    """The largest of the ranks' `seconds`: training goes on at the pace of the slowest rank."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def reference_save(state: dict[str, Any], folder: Path) -> float:
    dist.barrier()
    start = time.perf_counter()
    dcp.save(state, checkpoint_id=str(folder))
    return slowest(time.perf_counter() - start)


def our_save(ckpt: Checkpointer, step: int, model: nn.Module, opt: torch.optim.Optimizer
             ) -> tuple[float, float, float]:
    """Seconds training was blocked, of which building the shard state, and seconds until the save was
    committed; each the slowest rank's."""
    small = {"trainer": {"step": step}, "rng": torch.get_rng_state()}
    dist.barrier()
    start = time.perf_counter()
    shards = shard_state(model, opt)
    built = time.perf_counter() - start
    ckpt.save(step, small, {"loss": 1.0}, shards=shards)
    blocked = time.perf_counter() - start
    if not ckpt.flush(timeout=600):
        raise RuntimeError(f"sharded save of step {step} did not commit within 600 s")
    committed = time.perf_counter() - start
    return slowest(blocked), slowest(built), slowest(committed)


def shared_tmp(env: RankEnv) -> Path:
    """One fresh folder under /tmp for both ranks (rank 0 makes it)."""
    name = [tempfile.mkdtemp(prefix="bench-shardsave-", dir="/tmp") if env.is_main else None]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def measure(env: RankEnv, model_kwargs: dict, root: Path) -> dict:
    model, opt, params = trained_model(env, model_kwargs)
    state = shard_state(model, opt)
    ckpt = Checkpointer(CheckpointConfig(keep_last=1), root / "ours", None, StorageConfig(), is_writer=env.is_main,
                        sharded=True)
    sync, blocked, built, committed = [], [], [], []
    for step in range(1, SAVES + 1):
        sync.append(reference_save(state, root / f"dcp-{step}"))
        dist.barrier()
        if env.is_main:  # the disk holds one reference copy at a time
            shutil.rmtree(root / f"dcp-{step}")
        for times, seconds in zip((blocked, built, committed), our_save(ckpt, step, model, opt)):
            times.append(seconds)
    ckpt.close()
    nbytes = sum(f.stat().st_size for f in (root / "ours").rglob("*.distcp"))
    med = statistics.median
    return {"parameters": params, "shard_bytes_all_ranks": nbytes, "saves": SAVES,
            "copy_threads_per_rank": copy_threads(env.local_world_size),
            "sync_dcp_save_s": med(sync[1:]), "async_blocked_s": med(blocked[1:]),
            "async_blocked_first_s": blocked[0], "async_build_shard_state_s": med(built[1:]),
            "async_commit_s": med(committed[1:]),
            "ratio": med(blocked[1:]) / med(sync[1:]), "all": {"sync": sync, "blocked": blocked,
                                                                 "built": built, "committed": committed}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the bench runs")
    parser.add_argument("--dir", type=Path, default=None,
                        help="an empty folder to save into (its caller removes it); default: one under /tmp, "
                             "removed at the end")
    args = parser.parse_args()
    env = RankEnv.from_environ()
    init_distributed(env, torch.device("cpu"))
    model_kwargs = SMALL if args.small else MODEL
    root = args.dir or shared_tmp(env)
    try:
        result = measure(env, model_kwargs, root)
        if env.is_main:
            print(json.dumps({**result, "model": model_kwargs}), flush=True)
    finally:
        if env.is_main and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
