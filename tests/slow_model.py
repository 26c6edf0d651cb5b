"""User code for the slow-rank test (tests/test_slow_ranks.py), loaded by the ranks through code_dir: a small
classifier whose training forward pass sleeps `delay_s` on rank `slow_rank` (a node that computes slower).
The rank comes from torchrun's RANK variable, as a user's code would read it."""
from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

FEATURES, CLASSES = 16, 4


def data(n: int = 256, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4]), TensorDataset(x[n * 3 // 4:], y[n * 3 // 4:])


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
