"""The `resilience:` recipe section: when a run counts as hung, and how often its ranks are started again
inside the allocation after a hang or a crash (`jobs.watchdog`, run by the supervisor of every rank).

One section for the trainer and for `launcher run` scripts alike: the `trainer:` section is not part of a
script's recipe, and a hang or a crash is the same event whatever the ranks run. The budgets count restarts
inside the allocation (the ranks start again, the machines stay ours), so they are recipe settings, the
same on every backend; `slurm.max_failures` and `vms.max_failures` count what comes after them: a requeue
or a relaunch on new machines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jobs.schema.checks import non_negative
from jobs.schema.errors import ConfigError, short

HANG_FLOOR_S = 300.0  # the default timeout's floor: startup, a first step that compiles, a long evaluation
HANG_STEPS = 20  # the default timeout is this many times the slowest step seen (a loaded machine varies)


@dataclass(frozen=True)
class ResilienceConfig:
    # no progress on a rank for this many seconds is a hang; null: max(300, 20 x the slowest step seen)
    hang_timeout_s: Optional[float] = None
    max_hang_restarts: int = 2  # restarts after a hang before the run stops (0: a hang ends the run)
    max_crash_restarts: int = 0  # restarts after a rank crashed (a crash is usually a bug: opt in)

    def check(self, src: str) -> None:
        if self.hang_timeout_s is not None and not self.hang_timeout_s > 0:
            raise ConfigError(src, "resilience.hang_timeout_s", f"{short(self.hang_timeout_s)} must be > 0",
                              "give seconds, e.g. resilience.hang_timeout_s=600, or null for the default "
                              f"max({HANG_FLOOR_S:.0f}, {HANG_STEPS} x the slowest step)")
        non_negative(src, "resilience.max_hang_restarts", self.max_hang_restarts)
        non_negative(src, "resilience.max_crash_restarts", self.max_crash_restarts)


def hang_timeout(setting: Optional[float], slowest_step_s: float) -> float:
    """Seconds without progress that make a hang: the setting, else max(300, 20 x the slowest step seen)."""
    if setting is not None:
        return setting
    return max(HANG_FLOOR_S, HANG_STEPS * slowest_step_s)
