"""What training minimises and evaluation measures: the recipe's loss and metrics, resolved from their
import paths (`loss.target`, `metrics.<name>`), and the built-in accuracy metric."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from jobs.targets import resolve
from jobs.schema import RecipeConfig

# fn(outputs, targets) -> a tensor: the batch's mean (a loss), or one value per sample (a metric may be either)
BatchFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    loss: BatchFn  # the batch's mean loss, the one thing backward() is called on
    metrics: dict[str, BatchFn]  # evaluated besides the loss, logged as val/<name>

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig, src: str) -> Objective:
        """Resolve the recipe's loss and metrics; `src` names the recipe in errors."""
        loss = resolve(src, "loss.target", recipe.loss.target)
        if recipe.loss.kwargs:  # no partial without kwargs: the built-in loss stays the very same function
            loss = functools.partial(loss, **recipe.loss.kwargs)
        metrics = {name: resolve(src, f"metrics.{name}", path) for name, path in recipe.eval_metrics.items()}
        return cls(loss, metrics)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in classification metric (`jobs.training.objective:accuracy`): 1 per correct sample, 0 else.
    Per sample rather than a mean, so that the sum over the validation set counts exactly."""
    return outputs.argmax(1) == targets


def batch_sum(value: torch.Tensor | float, n: int) -> torch.Tensor:
    """A loss or metric of a batch of `n` samples as its sum over the batch, in float64: per-sample values
    are summed, a mean is weighted by `n`."""
    value = torch.as_tensor(value)
    if value.ndim == 0:
        return value.double() * n
    if value.shape[0] != n:
        raise ValueError(f"a loss or metric gave a tensor of shape {tuple(value.shape)} for a batch of {n}: "
                         "return the batch's mean or one value per sample")
    return value.double().sum()
