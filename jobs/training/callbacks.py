"""Hooks the training loop calls, so that what watches a run (a benchmark, a test, a launcher
waiting for the run to be up) lives outside the loop and the loop knows none of them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol, Sequence


from jobs.training.state import TrainState


class Callback(Protocol):
    """Both hooks are optional: a callback defines the ones it needs."""

    def on_step_end(self, progress: TrainState) -> None:
        """After each optimizer step, before its logging, evaluation and checkpoint."""

    def on_evaluate(self, progress: TrainState, metrics: dict[str, float]) -> bool:
        """After each evaluation (every rank has the same metrics). True asks the run to end now with
        outcome "pruned" (a sweep's pruner); rank 0's answer is the one every rank follows."""


class Callbacks:
    """The registered callbacks, called in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_step_end(self, progress: TrainState) -> None:
        for callback in self.callbacks:
            hook = getattr(callback, "on_step_end", None)
            if hook is not None:
                hook(progress)

    def on_evaluate(self, progress: TrainState, metrics: dict[str, float]) -> bool:
        """Every callback sees the evaluation; True if any asks to end the run."""
        ask = False
        for callback in self.callbacks:
            hook = getattr(callback, "on_evaluate", None)
            if hook is not None:
                ask = bool(hook(progress, metrics)) or ask
        return ask


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
