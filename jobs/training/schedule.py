"""How long the run is and how it optimizes: the step count, the optimizers and the LR schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch

from jobs.training.parts import LRSchedulers, ModelParts, Optimizers
from jobs.schema import OptimConfig, RecipeConfig, ScheduleConfig


def planned_steps(recipe: RecipeConfig, n_train: int, replicas: int) -> int:
    """trainer.max_steps, or the optimizer steps of trainer.epochs full passes (partial steps dropped);
    `replicas`: the data-parallel ranks sharing the training set."""
    t = recipe.trainer
    if t.max_steps is not None:
        return t.max_steps
    per_rank = n_train // replicas
    steps_per_epoch = per_rank // recipe.replica_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training samples make no full step of global batch {t.global_batch}: "
                         "lower trainer.global_batch")
    return (t.epochs or 1) * steps_per_epoch


def build_optimizers(cfg: OptimConfig, model: ModelParts) -> Optimizers:
    """One optimizer per model part, over its trainable (not frozen) parameters."""
    return Optimizers([_optimizer(cfg, [p for p in part.parameters() if p.requires_grad]) for part in model.parts],
                      model.parts, pipelined=model.pipelined)


def _optimizer(o: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_schedulers(cfg: ScheduleConfig, optimizers: Optimizers, total_steps: int) -> LRSchedulers:
    return LRSchedulers([torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, total_steps)) for opt in optimizers])


def lr_multiplier(s: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The factor on optim.lr at each step: linear warmup over schedule.warmup_steps, then cosine
    decay to min_lr_ratio at `total_steps`, step decay by gamma every step_size steps, or constant."""
    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        after = step - s.warmup_steps
        if s.name == "cosine":
            progress = min(1.0, after / max(1, total_steps - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "step":
            return s.gamma ** (after // s.step_size)
        return 1.0
    return factor
