"""Validation: the loss and the recipe's metrics over the whole validation set, split over the ranks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jobs import parallel
from jobs.parallel.pipeline import PipelineRunner
from jobs.training.objective import batch_sum
from jobs.training.step import StepSettings, autocast


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: the step it ran after and what it measured ("val/loss", "val/acc")."""

    step: int
    metrics: dict[str, float]

    def line(self) -> str:
        return ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items())


def evaluate(model: nn.Module, dataset: Dataset, replicas: tuple[int, int], settings: StepSettings) -> dict[str, float]:
    """val/loss and val/<metric> over the whole validation set, each sample counted once per data-parallel
    replica: `replicas` is (replicas, this rank's replica), parallel.data_parallel's. The ranks of a tensor-
    parallel group evaluate their replica's share together (their forward is a collective); each adds the
    same sums, which count its samples as often as their count does: the means are the same."""
    model.eval()
    device, objective, t = settings.device, settings.objective, settings.trainer
    fns = {"loss": objective.loss, **objective.metrics}
    count, replica = replicas
    shard = list(range(replica, len(dataset), count))  # no padding: no sample counted twice
    sums = torch.zeros(len(fns) + 1, dtype=torch.float64, device=device)  # one sum per fn, then the count
    batch = settings.eval_batch
    loader = DataLoader(dataset, batch_size=batch, sampler=shard, generator=torch.Generator())
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast(t.precision, device):
                outputs = parallel.unwrap(model)(x).float()
            for i, fn in enumerate(fns.values()):
                sums[i] += batch_sum(fn(outputs, y), len(y))
            sums[-1] += len(y)
        if parallel.forward_is_collective(model):  # FSDP gathers weights in every forward: match rank 0's count
            most = math.ceil(math.ceil(len(dataset) / count) / batch)  # replica 0 has the largest shard
            _idle_forwards(model, dataset, most - len(loader), settings)
    sums = parallel.all_reduce_sum(sums)
    return {f"val/{name}": (sums[i] / sums[-1]).item() for i, name in enumerate(fns)}


def evaluate_pipeline(runner: PipelineRunner, dataset: Dataset, settings: StepSettings) -> dict[str, float]:
    """The same measures through a pipeline: each replica's stages run the replica's share of the validation
    set through the schedule, in batches of trainer.micro_batch (the shapes the stages were built for); the
    last stages measure their logits and every rank gets the sums (zeros from the other stages, summed over
    the replicas' shares). A short last batch is padded with repeats of a sample whose outputs are dropped:
    each sample counts once."""
    device, objective, batch = settings.device, settings.objective, settings.trainer.micro_batch
    fns = {"loss": objective.loss, **objective.metrics}
    sums = torch.zeros(len(fns) + 1, dtype=torch.float64, device=device)  # one sum per fn, then the count
    layout = runner.layout
    # strided, no padding: the shares are disjoint; the stages of one replica read the same one, in step
    share = list(range(layout.replica, len(dataset), layout.replicas))
    for x, y in DataLoader(dataset, batch_size=batch, sampler=share, generator=torch.Generator()):
        real = len(y)
        _, outputs = runner.eval_step(_pad(x, batch), _pad(y, batch))
        if runner.is_last:
            outputs, y = outputs[:real].float(), y.to(device)
            with torch.no_grad():
                for i, fn in enumerate(fns.values()):
                    sums[i] += batch_sum(fn(outputs, y), real)
            sums[-1] += real
    sums = parallel.all_reduce_sum(sums)
    return {f"val/{name}": (sums[i] / sums[-1]).item() for i, name in enumerate(fns)}


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    missing = size - t.shape[0]
    return torch.cat([t, t[:1].expand(missing, *t.shape[1:])]) if missing else t


def _idle_forwards(model: nn.Module, dataset: Dataset, count: int, settings: StepSettings) -> None:
    """Forwards whose outputs are dropped, for a rank with fewer validation batches than rank 0."""
    if count <= 0:
        return
    x, _ = next(iter(DataLoader(dataset, batch_size=1)))
    for _ in range(count):
        with autocast(settings.trainer.precision, settings.device):
            model(x.to(settings.device))
