"""Hooks the training loop calls, so that what watches a run (a benchmark, a test, a launcher
waiting for the run to be up) lives outside the loop and the loop knows none of them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol, Sequence

from jobs.training.state import TrainState


class Callback(Protocol):
    def on_step_end(self, progress: TrainState) -> None:
        """After each optimizer step, before its logging, evaluation and checkpoint."""


class Callbacks:
    """The registered callbacks, called in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_step_end(self, progress: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_step_end(progress)


class FirstStepMarker:
    """Writes <run_dir>/first_step.json ({"time": unix seconds, "step": n}) once, after the first
    step this process finishes (the first step of each start, so also after a resume). It is how
    an outsider knows the run is training: `make bench` measures launch-to-first-step with it, and
    tests wait for it before signalling a run. Only one rank should write it."""

    def __init__(self, run_dir: Path) -> None:
        self.path: Path | None = run_dir / "first_step.json"

    def on_step_end(self, progress: TrainState) -> None:
        if self.path is None:
            return
        self.path.write_text(json.dumps({"time": time.time(), "step": progress.step}))
        self.path = None
