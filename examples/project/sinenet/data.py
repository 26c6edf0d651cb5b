"""The data: sums of sines, generated from a seed (no download, the same on every rank and machine)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


def make_sines(inputs: int, samples: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x uniform in [-3, 3]^inputs, y = sum_i a_i sin(f_i x_i + p_i) + noise: amplitudes, frequencies
    and phases drawn once from `seed`, so train and validation follow the same function."""
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(inputs, generator=g) + 0.5
    frequency = torch.rand(inputs, generator=g) * 2 + 0.5
    phase = torch.rand(inputs, generator=g) * 6.2832
    x = torch.rand(samples, inputs, generator=g) * 6 - 3
    y = (amplitude * torch.sin(frequency * x + phase)).sum(dim=1, keepdim=True)
    return x, y + noise * torch.randn(samples, 1, generator=g)


def sines(inputs: int = 4, samples: int = 2048, noise: float = 0.05, val_fraction: float = 0.2,
          seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, validation) data sets of (features, target) pairs."""
    x, y = make_sines(inputs, samples, noise, seed)
    n_val = int(samples * val_fraction)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])
