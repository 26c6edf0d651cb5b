"""Evaluation metrics: fn(outputs, targets) -> one value per sample (averaged over the validation set)."""
from __future__ import annotations

import torch


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each sample."""
    return (outputs - targets).abs().mean(dim=1)
