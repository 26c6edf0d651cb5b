"""When to save, and which checkpoint is the best: decided here once, from the `checkpoint:` section.

The trainer asks the policy (through its Checkpointer) whether a save is due after a step and at the
end, and keeps the run's best value (`progress.best`) with `best_after`; retention keeps the best
checkpoint by the same `score`, so "best" has one definition: the larger (best_mode=max) or smaller
(min) value of best_metric, a missing or NaN value never counting. Torch-free.
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Optional

from jobs.schema import CheckpointConfig


def score(cfg: CheckpointConfig, metrics: Mapping[str, float]) -> Optional[float]:
    """How good `metrics` are by best_metric, larger is better whatever best_mode; None when there is
    no best_metric or `metrics` lack it (or it is NaN): such a save is never the best."""
    if not cfg.best_metric:
        return None
    value = metrics.get(cfg.best_metric, math.nan)
    if math.isnan(value):
        return None
    return value if cfg.best_mode == "max" else -value


def best_after(cfg: CheckpointConfig, best: Optional[float], metrics: Mapping[str, float]) -> Optional[float]:
    """The run's best value of best_metric once `metrics` are in (`best`: the best so far, or None)."""
    new = score(cfg, metrics)
    if new is None or cfg.best_metric is None:
        return best
    old = None if best is None else score(cfg, {cfg.best_metric: best})
    return best if old is not None and old >= new else metrics[cfg.best_metric]


class SavePolicy:
    """When a save is due: every `every_steps` steps, `every_minutes` after the last save (on this
    rank's clock: ranks agree on it before acting, jobs.training.agreement), when the ranks agreed to
    stop, and at the end of a completed run unless that step was just saved."""

    def __init__(self, cfg: CheckpointConfig) -> None:
        self.cfg = cfg
        self._last_save = time.monotonic()

    def restart_clock(self) -> None:
        """every_minutes counts from now (the training loop starts; a save just ended)."""
        self._last_save = time.monotonic()

    def due_by_time(self) -> bool:
        """every_minutes have passed since the last save, on this rank's clock."""
        return bool(self.cfg.every_minutes) and time.monotonic() - self._last_save >= self.cfg.every_minutes * 60

    def due_at_step(self, step: int) -> bool:
        """every_steps says to save at `step` (the same answer on every rank)."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def due_after_step(self, step: int, stopping: bool, time_due: bool) -> bool:
        """After an optimizer step: `stopping` and `time_due` as all ranks agreed on them."""
        return stopping or self.due_at_step(step) or time_due

    def best_after(self, best: Optional[float], metrics: Mapping[str, float]) -> Optional[float]:
        """The run's best value of best_metric once `metrics` are in (see best_after())."""
        return best_after(self.cfg, best, metrics)

    def due_at_end(self, step: int) -> bool:
        """A completed run saves its last step (at_end), unless every_steps just saved it."""
        return self.cfg.at_end and not self.due_at_step(step)
