"""A training script that survives preemption with the launcher's runtime API.

    launcher run train_resumable.py --procs-per-node 2 -- --steps 200

It trains a small MLP with DDP on data it generates, checks `runtime.should_stop()` once per step,
and when told to stop (a Slurm preemption notice, `launcher cancel`, Ctrl-C) saves a checkpoint
and exits; started again (a requeue on Slurm, or the same command with --run-name), it continues
from that checkpoint and ends with the same weights as a run that was never stopped.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs import runtime


def batch(step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of `step` on `rank`: a function of both, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.rand(size, 4, generator=g) * 6 - 3
    return x, torch.sin(x).sum(dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (to watch a stop)")
    args = parser.parse_args()

    env = runtime.rank_env()
    if env.distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ckpt = runtime.checkpointer()
    start = 0
    found = ckpt.load_latest(map_location="cpu")
    if found is not None:
        start, state = found
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        print(f"resumed at step {start}", flush=True)
    ddp = DistributedDataParallel(model) if env.distributed else model

    step = start
    while step < args.steps:
        x, y = batch(step, env.rank, args.batch)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if env.is_main and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        time.sleep(args.step_sleep)
        if runtime.should_stop():  # every rank, every step: the same answer on all of them
            print(f"stopping at step {step} ({runtime.stop_signal() or 'another rank was signalled'})", flush=True)
            break
    if step > start:  # run again after it had finished, it has nothing new to save
        ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
    ckpt.close()  # waits until the checkpoint is committed
    if env.distributed:
        dist.barrier()  # every rank meets before leaving (gloo can abort a group destroyed mid-collective)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
