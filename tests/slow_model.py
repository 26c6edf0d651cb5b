"""User code for the slow-rank test (tests/test_slow_ranks.py), loaded by the ranks through code_dir: a small
classifier whose training forward pass sleeps `delay_s` on rank `slow_rank` (a node that computes slower),
and data whose training samples each take `delay_s` to load on rank `slow_rank` (a node with a slow disk;
docs/doctor.md shows a run of it). The rank comes from torchrun's RANK variable, as a user's code would
read it."""
from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

FEATURES, CLASSES = 16, 4


def data(n: int = 256, seed: int = 0, delay_s: float = 0.0, slow_rank: int = 1) -> tuple[Dataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    train = TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4])
    slow = delay_s if int(os.environ.get("RANK", "0")) == slow_rank else 0.0
    return (SlowSamples(train, slow) if slow else train), TensorDataset(x[n * 3 // 4:], y[n * 3 // 4:])


class SlowSamples(Dataset):
    """`dataset` with every sample `delay_s` slower to read."""

    def __init__(self, dataset: Dataset, delay_s: float) -> None:
        self.dataset, self.delay_s = dataset, delay_s

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay_s)
        return self.dataset[i]


class Slowed(nn.Module):
    def __init__(self, delay_s: float, slow_rank: int) -> None:
        super().__init__()
        self.layer = nn.Linear(FEATURES, CLASSES)
        self.delay_s = delay_s if int(os.environ.get("RANK", "0")) == slow_rank else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay_s:
            time.sleep(self.delay_s)
        return self.layer(x)


def slowed(delay_s: float = 0.0, slow_rank: int = 1) -> nn.Module:
    return Slowed(delay_s, slow_rank)
