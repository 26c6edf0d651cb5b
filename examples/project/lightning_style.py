"""A Lightning script as a Lightning user writes one, nothing of the launcher in it: an MLP on sklearn's
8x8 digits, DDP over every rank it is started with, on CPU with gloo. Needs `pip install lightning`.

    torchrun --nproc-per-node 2 lightning_style.py --steps 300 --root out
    launcher run lightning_style.py --cluster local_slurm --procs-per-node 2 -- --root={checkpoint_dir}

Lightning finds its ranks itself (SLURM_* under Slurm, torchrun's variables elsewhere). On Slurm its
SLURMEnvironment handles the preemption notice: it saves `hpc_ckpt_N.ckpt` in `--root` (its
default_root_dir), asks for a requeue, and the requeued job resumes from that file without being told
(see "Your own code": the launcher does the requeue). `--ckpt_path last` resumes from the `last.ckpt`
that the ModelCheckpoint writes every `--every` steps, for a relaunch. Rank 0 prints the step it starts
from, every `--every` steps, the step it ends at and a checksum of the final weights.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Digits(L.LightningModule):
    def __init__(self, lr: float, step_sleep: float, every: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr, self.step_sleep, self.every = lr, step_sleep, every

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        if self.step_sleep:
            time.sleep(self.step_sleep)  # room for a test to preempt the run mid-training
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_train_start(self) -> None:
        print(f"rank {self.global_rank}: training from step {self.trainer.global_step}", flush=True)

    def on_train_batch_end(self, *_: object) -> None:
        if self.global_rank == 0 and self.trainer.global_step % self.every == 0:
            print(f"step {self.trainer.global_step}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (Trainer max_steps)")
    parser.add_argument("--root", default=".", help="Trainer default_root_dir: where hpc_ckpt_N.ckpt goes")
    parser.add_argument("--ckpt_path", default=None, help="trainer.fit's ckpt_path (e.g. last)")
    parser.add_argument("--every", type=int, default=50, help="steps between last.ckpt saves")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds of sleep in every step")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    L.seed_everything(0, verbose=False)
    digits = load_digits()
    data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target))
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = int(os.environ.get("WORLD_SIZE", str(devices))) // devices
    checkpoints = ModelCheckpoint(dirpath=Path(args.root) / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=args.every)
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=nodes,
                        strategy="ddp" if devices * nodes > 1 else "auto", max_steps=args.steps, max_epochs=-1,
                        default_root_dir=args.root, callbacks=[checkpoints], logger=False, deterministic=True,
                        enable_progress_bar=False, enable_model_summary=False)
    model = Digits(args.lr, args.step_sleep, args.every)
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True), ckpt_path=args.ckpt_path)
    print(f"rank {trainer.global_rank}: finished at step {trainer.global_step}", flush=True)
    if trainer.is_global_zero:
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
        print(f"weights checksum {total:.10f}", flush=True)


if __name__ == "__main__":
    main()
