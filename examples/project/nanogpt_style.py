"""A script that resumes the way karpathy/nanoGPT's train.py does: only when told to, with a flag.

    torchrun --nproc-per-node 2 nanogpt_style.py --out_dir out --max_iters 200           # from scratch
    torchrun --nproc-per-node 2 nanogpt_style.py --out_dir out --init_from resume        # from out/ckpt.pt

Rank 0 saves {model, optimizer, iter_num} to OUT_DIR/ckpt.pt every --eval_interval iterations; it
handles no signal (a preemption kills it), and started again without --init_from=resume it starts
over and overwrites ckpt.pt. Under the launcher it resumes with one flag (see "Your own code"):

    launcher run nanogpt_style.py --procs-per-node 2 --resume-args '--init_from=resume' -- --out_dir={checkpoint_dir}

Each iteration's batch is drawn from (seed, iteration, rank), so a resumed run ends with the same
weights as one that ran through.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sinenet.data import make_sines
from sinenet.model import mlp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--init_from", default="scratch", choices=["scratch", "resume"])
    parser.add_argument("--max_iters", type=int, default=200)
    parser.add_argument("--eval_interval", type=int, default=20, help="save ckpt.pt every N iterations")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--iter_sleep", type=float, default=0.0, help="seconds per iteration (to watch it)")
    return parser.parse_args()


def get_batch(it: int, rank: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_sines(inputs=4, samples=batch_size, noise=0.05, seed=1000 * it + rank)


def main() -> None:
    args = parse_args()
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ddp else 0
    master_process = rank == 0
    torch.manual_seed(1337)
    model = mlp(inputs=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    iter_num = 0
    if args.init_from == "resume":
        checkpoint = torch.load(os.path.join(args.out_dir, "ckpt.pt"), map_location="cpu")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num = checkpoint["iter_num"]
        print(f"resuming from iter {iter_num}", flush=True)
    elif master_process:
        print("training from scratch", flush=True)
    if master_process:
        os.makedirs(args.out_dir, exist_ok=True)
    net = DistributedDataParallel(model) if ddp else model
    while iter_num < args.max_iters:
        x, y = get_batch(iter_num, rank, args.batch_size)
        loss = nn.functional.mse_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iter_num += 1
        time.sleep(args.iter_sleep)
        if iter_num % args.eval_interval == 0 and master_process:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num},
                       os.path.join(args.out_dir, "ckpt.pt"))
            print(f"iter {iter_num}: loss {loss.item():.4f}, saved ckpt.pt", flush=True)
    if master_process:
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        with open(os.path.join(args.out_dir, "final.json"), "w") as f:
            json.dump({"iter_num": iter_num, "weights_sha256": digest}, f)
        print(f"done at iter {iter_num}, weights {digest[:12]}", flush=True)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
