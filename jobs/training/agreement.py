"""When to stop and when to save, decided the same on every rank."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from schema import CheckpointConfig


class StopAgreement:
    """How ranks agree on stopping (a signal) and on time-based saves without a blocking collective
    per step: each step starts an asynchronous MAX all-reduce of this rank's flags and acts on the
    previous step's result, which every rank sees identically. The collective's latency hides
    behind the next step's compute; the price is acting one step later."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.distributed = dist.is_initialized()
        self._pending: Optional[tuple[Any, torch.Tensor]] = None

    def exchange(self, stop_requested: bool, time_due: bool) -> tuple[bool, bool]:
        """(stop, save now) as agreed by all ranks: each is True when it was True on any rank."""
        if not self.distributed:
            return stop_requested, time_due
        flags = torch.tensor([float(stop_requested), float(time_due)], device=self.device)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, flags)
        if previous is None:
            return False, False
        previous[0].wait()
        return bool(previous[1][0]), bool(previous[1][1])

    def drain(self) -> None:
        """Finish the collective still in flight so every rank leaves the loop with none pending."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def save_due_at_step(cfg: CheckpointConfig, step: int) -> bool:
    """checkpoint.every_steps says to save at `step` (the same answer on every rank)."""
    return bool(cfg.every_steps) and step % cfg.every_steps == 0


def save_due_by_time(cfg: CheckpointConfig, last_save: float) -> bool:
    """checkpoint.every_minutes have passed since `last_save` (time.monotonic()) on this rank's
    clock; ranks' clocks differ, so this goes through StopAgreement.exchange() before acting."""
    return bool(cfg.every_minutes) and time.monotonic() - last_save >= cfg.every_minutes * 60
