"""A plain DDP training script, written for torchrun: it knows nothing of the launcher.

    torchrun --nproc-per-node 2 train_ddp.py --steps 100          # as written for torchrun
    launcher run train_ddp.py --procs-per-node 2 -- --steps 100   # the same script, through the launcher

Each rank reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) through
`init_process_group(init_method="env://")`, trains the sinenet MLP on its shard of the data and prints
what it did; rank 0 reports the validation error.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from sinenet.data import sines
from sinenet.model import mlp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def setup() -> torch.device:
    """One process group over all ranks: NCCL on GPUs (one per local rank), gloo on CPUs."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def batches(loader: DataLoader, sampler: DistributedSampler):
    """Endless batches: a new shuffle each epoch (set_epoch keeps the ranks' shards disjoint)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def val_mae(model: nn.Module, data, device: torch.device) -> float:
    x, y = data.tensors
    return (model(x.to(device)) - y.to(device)).abs().mean().item()


def main() -> None:
    args = parse_args()
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} of {world} on {device}: training {args.steps} steps", flush=True)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    train, val = sines(inputs=4, seed=args.seed)
    model = DistributedDataParallel(mlp(inputs=4).to(device), device_ids=[device.index] if device.index is not None
                                    else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sampler = DistributedSampler(train, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)

    seen = 0
    for step, (x, y) in zip(range(1, args.steps + 1), batches(loader, sampler)):
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks here
        opt.step()
        seen += len(x)
        if rank == 0 and step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    print(f"rank {rank} done: {args.steps} steps, {seen} samples", flush=True)
    if rank == 0:
        print(f"val/mae {val_mae(model.module, val, device):.4f}", flush=True)
    # every rank meets before leaving: destroying a gloo group while a peer is still busy (rank 0
    # evaluating) sometimes aborts the process ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
