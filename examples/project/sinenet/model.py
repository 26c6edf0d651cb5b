"""The model: a small residual MLP (any callable that returns an nn.Module will do)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """x + MLP(LayerNorm(x)): residual blocks let a deeper MLP train as easily as a shallow one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def mlp(inputs: int, outputs: int = 1, width: int = 32, depth: int = 2) -> nn.Module:
    """`inputs` features -> `depth` residual blocks of `width` -> `outputs` values."""
    return nn.Sequential(nn.Linear(inputs, width), *(Block(width) for _ in range(depth)), nn.Linear(width, outputs))
