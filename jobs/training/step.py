"""One optimizer step: the micro-batches it consumes, gradient accumulation and mixed precision."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from jobs import parallel
from jobs.data import ignore_stop_signals
from jobs.pipeline import PipelineRunner
from jobs.pipeline import clip_grad_norm_ as pipeline_clip_grad_norm_
from jobs.training.objective import Objective
from jobs.training.parts import ModelParts, Optimizers
from schema import TrainerConfig

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepSettings:
    """What every training step and evaluation of a run uses, fixed for the run."""

    trainer: TrainerConfig
    device: torch.device
    objective: Objective


def micro_batches(dataset: Dataset, sampler: DistributedSampler, skip_steps: int, steps: int, micro: int,
                  accum: int, workers: int) -> Iterator[MicroBatches]:
    """Yield the remaining optimizer steps of this epoch as lists of `accum` micro-batches; skipping
    at the index level puts a resumed run on exactly the samples the interrupted one would have seen."""
    per_step = micro * accum
    indices = list(sampler)[skip_steps * per_step: steps * per_step]
    # An own generator: creating a loader must not draw from the global RNG, or a resumed run's
    # dropout stream would drift from the uninterrupted run's.
    gen = torch.Generator().manual_seed(len(indices) * 7919 + skip_steps)
    loader = DataLoader(dataset, batch_size=micro, sampler=indices, num_workers=workers, drop_last=False,
                        generator=gen, worker_init_fn=ignore_stop_signals)
    group: MicroBatches = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def train_step(model: ModelParts, optimizers: Optimizers, scaler: Optional[torch.amp.GradScaler],
               micro: MicroBatches, settings: StepSettings) -> torch.Tensor:
    """Forward and backward over the micro-batches, then one optimizer step; returns the summed loss
    (a tensor: reading it would synchronize with the device every step)."""
    cfg, device, loss_fn = settings.trainer, settings.device, settings.objective.loss
    module = model.single
    model.train()
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = i == len(micro) - 1
        # Reduce gradients once per optimizer step: no sync on every micro-step but the last.
        with parallel.gradient_sync(module, sync=last):
            with autocast(cfg.precision, device):
                loss = loss_fn(module(x), y) / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    if cfg.grad_clip is not None:
        # over FSDP's sharded gradients (DTensors) torch reduces the shards' norms across ranks: the
        # total norm is the whole model's, as with DDP
        nn.utils.clip_grad_norm_(model.trainable(), cfg.grad_clip)
    if scaler is not None:
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    else:
        for opt in optimizers:
            opt.step()
    optimizers.zero_grad()
    return total


def pipeline_train_step(runner: PipelineRunner, optimizers: Optimizers, micro: MicroBatches,
                        settings: StepSettings) -> torch.Tensor:
    """One optimizer step of a pipeline stage: the schedule runs forward and backward over the batch's
    microbatches (they take the place of gradient accumulation: the recipe has one micro batch per
    replica and step), the stage's replicas average their gradients, the gradient is clipped by the
    whole model's norm, then this stage's optimizer steps. Returns this replica's batch loss, the same
    on each of its stages (the logged loss is the mean over ranks: over replicas, as with DDP)."""
    (x, y), = micro
    runner.module.train()
    loss = runner.train_step(x, y)
    if settings.trainer.grad_clip is not None:
        pipeline_clip_grad_norm_(runner.module, settings.trainer.grad_clip, runner.group)
    for opt in optimizers:
        opt.step()
    optimizers.zero_grad()
    return loss


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossWindow:
    """Training loss and throughput since the last log line. The loss stays a device tensor so that
    steps between log lines never wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.started = torch.zeros((), device=self.device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.started
