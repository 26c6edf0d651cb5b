"""A script that resumes the way pytorch/examples' DDP tutorial (multigpu_torchrun.py) does: from a
snapshot file in its working directory, whenever it finds one.

    torchrun --nproc-per-node 2 tutorial_style.py --total_epochs 10 --save_every 1

Rank 0 writes snapshot.pt ({MODEL_STATE, OPTIMIZER_STATE, EPOCHS_RUN}) every --save_every epochs; every
rank loads it at start if it exists. Started from a shared folder, every run would find the last
one's snapshot; under the launcher the working directory is the run's own (`--workdir run`, the
default), so each run has its snapshot and a restart of the same run finds it:

    launcher run tutorial_style.py --procs-per-node 2 -- --total_epochs 10 --save_every 1
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
from torch.utils.data import DataLoader, DistributedSampler

from sinenet.data import sines
from sinenet.model import mlp


class Trainer:
    def __init__(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, save_every: int,
                 snapshot_path: str, epoch_sleep: float) -> None:
        self.gpu_id = int(os.environ["LOCAL_RANK"])
        self.rank = int(os.environ["RANK"])
        self.model, self.loader, self.optimizer = model, loader, optimizer
        self.save_every, self.snapshot_path, self.epoch_sleep = save_every, snapshot_path, epoch_sleep
        self.epochs_run = 0
        if os.path.exists(snapshot_path):
            print("Loading snapshot", flush=True)
            self._load_snapshot(snapshot_path)
        self.model = DistributedDataParallel(self.model)

    def _load_snapshot(self, path: str) -> None:
        snapshot = torch.load(path, map_location="cpu")
        self.model.load_state_dict(snapshot["MODEL_STATE"])
        self.optimizer.load_state_dict(snapshot["OPTIMIZER_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        print(f"Resuming training from snapshot at Epoch {self.epochs_run}", flush=True)

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {"MODEL_STATE": self.model.module.state_dict(), "OPTIMIZER_STATE": self.optimizer.state_dict(),
                    "EPOCHS_RUN": epoch + 1}
        torch.save(snapshot, self.snapshot_path + ".tmp")
        os.replace(self.snapshot_path + ".tmp", self.snapshot_path)  # a kill mid-save leaves the last one whole
        print(f"Epoch {epoch} | Training snapshot saved at {self.snapshot_path}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(self.epochs_run, max_epochs):
            self.loader.sampler.set_epoch(epoch)
            for x, y in self.loader:
                self.optimizer.zero_grad()
                nn.functional.mse_loss(self.model(x), y).backward()
                self.optimizer.step()
            print(f"[GPU{self.gpu_id}] Epoch {epoch} | Steps: {len(self.loader)}", flush=True)
            time.sleep(self.epoch_sleep)
            if self.rank == 0 and (epoch + 1) % self.save_every == 0:
                self._save_snapshot(epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total_epochs", type=int, default=10)
    parser.add_argument("--save_every", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epoch_sleep", type=float, default=0.0, help="seconds per epoch (to watch it)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    train, _ = sines(inputs=4, samples=512)
    model = mlp(inputs=4)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=DistributedSampler(train, seed=0))
    trainer = Trainer(model, loader, torch.optim.AdamW(model.parameters(), lr=3e-3), args.save_every,
                      "snapshot.pt", args.epoch_sleep)
    trainer.train(args.total_epochs)
    if trainer.rank == 0:
        weights = b"".join(p.detach().numpy().tobytes() for p in trainer.model.module.parameters())
        with open("final.json", "w") as f:
            json.dump({"epochs": args.total_epochs, "weights_sha256": hashlib.sha256(weights).hexdigest()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
