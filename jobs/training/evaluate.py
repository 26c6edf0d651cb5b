"""Validation: loss and accuracy over the whole validation set, split over the ranks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jobs import parallel
from jobs.env import RankEnv
from jobs.training.step import autocast


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: the step it ran after and what it measured ("val/loss", "val/acc")."""

    step: int
    metrics: dict[str, float]

    def line(self) -> str:
        return ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())


def evaluate(model: nn.Module, dataset: Dataset, batch: int, env: RankEnv, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """Loss and accuracy over the whole validation set, each sample counted once across ranks."""
    model.eval()
    shard = list(range(env.rank, len(dataset), env.world_size))  # no padding: no sample counted twice
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch, sampler=shard, generator=torch.Generator()):
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                logits = parallel.unwrap(model)(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.numel()
    sums = parallel.all_reduce_sum(sums)
    return {"val/loss": (sums[0] / sums[2]).item(), "val/acc": (sums[1] / sums[2]).item()}
