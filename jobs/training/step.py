"""One optimizer step: the micro-batches it consumes, gradient accumulation and mixed precision."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from jobs import parallel
from jobs.data import ignore_stop_signals
from jobs.parallel.pipeline import PipelineRunner
from jobs.parallel.pipeline import clip_grad_norm_ as pipeline_clip_grad_norm_
from jobs.parallel.tensor import clip_grad_norm_
from jobs.training.memory import is_oom
from jobs.training.objective import Objective
from jobs.training.parts import ModelParts, Optimizers
from jobs.training.slow_ranks import StepClock
from jobs.schema import TrainerConfig

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger("jobs.trainer")


@dataclass(frozen=True)
class StepSettings:
    """What every training step and evaluation of a run uses, fixed for the run."""

    trainer: TrainerConfig
    device: torch.device
    objective: Objective
    eval_batch: int = 128  # samples per evaluation forward pass (4 micro batches: no gradients kept)
    clock: Optional[StepClock] = None  # times this rank's step in parts for the slow-rank report


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


class StepOutOfMemory(Exception):
    """A forward or backward pass of this optimizer step ran out of memory on `ranks`; every rank raises
    it at the same micro-batch, before any gradient was reduced, so the step can be redone."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"out of memory on rank(s) {ranks}")
        self.ranks = ranks


def train_step(model: ModelParts, optimizers: Optimizers, scaler: Optional[torch.amp.GradScaler],
               micro: MicroBatches, settings: StepSettings, guard: bool = False) -> torch.Tensor:
    """Forward and backward over the micro-batches, then one optimizer step; returns the summed loss
    (a tensor: reading it would synchronize with the device every step).

    With `guard`, an out-of-memory error does not end the run: the ranks exchange a flag before every
    backward pass (a host-side all-reduce of one number per rank), and when any rank ran out of memory
    every rank raises StepOutOfMemory there, before the gradients of the step are reduced."""
    cfg, device, loss_fn, clock = settings.trainer, settings.device, settings.objective.loss, settings.clock
    module = model.single
    if clock is not None:
        clock.start()
    model.train()
    total = torch.zeros((), device=device)
    failed = False  # this rank ran out of memory in an earlier micro-batch of the step
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = i == len(micro) - 1
        # Reduce gradients once per optimizer step: no sync on every micro-step but the last.
        with parallel.gradient_sync(module, sync=last):
            loss = None
            try:
                if not failed:
                    with autocast(cfg.precision, device):
                        loss = loss_fn(module(x), y) / len(micro)
            except Exception as err:  # noqa: BLE001 - only an allocator failure is kept, below
                if not (guard and is_oom(err)):
                    raise
                failed = _said(err, "forward", i, len(micro))
            if last and clock is not None:
                # DDP reduces gradients during this backward pass: waiting for the others starts here (and
                # in the guard's exchange just below, where a fast rank waits for a slow one's forward pass)
                clock.mark()
            if guard:
                _agree(failed)
            try:
                (scaler.scale(loss) if scaler is not None else loss).backward()
            except Exception as err:  # noqa: BLE001
                if not (guard and is_oom(err)):
                    raise
                if last and dist.is_initialized():
                    raise RuntimeError(_LAST_BACKWARD) from err
                failed = _said(err, "backward", i, len(micro))  # told to the others at the next exchange
        total += loss.detach()
    if guard and failed:  # one rank: its last backward ran out of memory
        _agree(failed)
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    if cfg.grad_clip is not None:
        # over FSDP's sharded gradients (DTensors) the shards' norms are reduced across ranks: the
        # total norm is the whole model's, as with DDP (tensor parallelism: gradients on two meshes)
        clip_grad_norm_(model.trainable(), cfg.grad_clip)
    if scaler is not None:
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    else:
        for opt in optimizers:
            opt.step()
    optimizers.zero_grad()
    if clock is not None:
        clock.end()
    return total


# DDP reduces gradients during the last micro-batch's backward pass: a rank that runs out of memory there
# cannot tell the others, who wait inside the all-reduce. Ending this rank ends the run at once (the
# launcher stops the others) instead of a hang until the process-group timeout.
_LAST_BACKWARD = ("out of memory in the last micro-batch's backward pass, while DDP was reducing gradients: the "
                  "other ranks cannot be told to retry. The micro batch found by trainer.micro_batch=auto left "
                  "too little headroom; set a smaller trainer.micro_batch")


def _said(err: BaseException, where: str, index: int, count: int) -> bool:
    """This rank's own allocator message, in its log (rank 0 reports only which ranks failed)."""
    log.warning("out of memory in the %s pass of micro-batch %d/%d: %s", where, index + 1, count,
                str(err).splitlines()[0][:300])
    return True


def _agree(failed: bool) -> None:
    ranks = parallel.ranks_where(failed)
    if ranks:
        raise StepOutOfMemory(ranks)


def resplit(micro: MicroBatches, size: int) -> MicroBatches:
    """The same samples, in the same order, as micro-batches of `size` (a step redone with a smaller one)."""
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    return list(zip(x.split(size), y.split(size)))


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
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16  # fp8: float8 matmuls, bf16 around them
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossWindow:
    """Training loss since the last log line (its rates: jobs.training.throughput). The loss stays a device
    tensor so that steps between log lines never wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps = torch.zeros((), device=self.device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1
