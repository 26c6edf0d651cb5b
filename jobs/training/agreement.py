"""When to stop and when to save, decided the same on every rank."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from schema import CheckpointConfig


class StopAgreement:
    """How ranks agree on stopping (a signal) and on time-based saves: after each step, one MAX
    all-reduce of this rank's two flags, which every rank sees identically.

    Synchronous on purpose: when a spot notice reaches one rank during step k, every rank saves at the
    end of step k. An asynchronous exchange hidden behind the next step would act a whole step later,
    which is seconds of GCE's 30 s window, and with long steps (heavy gradient accumulation) could miss
    it. The price is one round trip of 8 bytes per step. The flags are CPU tensors, on a gloo group of
    their own when training runs on NCCL, so reading them never waits for the GPU's queue."""

    def __init__(self) -> None:
        self.distributed = dist.is_initialized()
        self.group = None
        if self.distributed and "gloo" not in dist.get_backend():
            self.group = dist.new_group(backend="gloo")  # a collective: every rank makes its agreement at once

    def exchange(self, stop_requested: bool, time_due: bool) -> tuple[bool, bool]:
        """(stop, save now) as agreed by all ranks: each is True when it was True on any rank."""
        if not self.distributed:
            return stop_requested, time_due
        flags = torch.tensor([float(stop_requested), float(time_due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0]), bool(flags[1])


def save_due_at_step(cfg: CheckpointConfig, step: int) -> bool:
    """checkpoint.every_steps says to save at `step` (the same answer on every rank)."""
    return bool(cfg.every_steps) and step % cfg.every_steps == 0


def save_due_by_time(cfg: CheckpointConfig, last_save: float) -> bool:
    """checkpoint.every_minutes have passed since `last_save` (time.monotonic()) on this rank's
    clock; ranks' clocks differ, so this goes through StopAgreement.exchange() before acting."""
    return bool(cfg.every_minutes) and time.monotonic() - last_save >= cfg.every_minutes * 60
