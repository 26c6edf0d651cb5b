"""The slow-rank report: a rank on a sick node that computes at half speed slows every rank of a synchronous
run, and nothing else says so. Each rank times its own compute in every step; every log interval the ranks
exchange one number each (a small all-gather on the host gloo group), and rank 0 warns about a rank slower
than `trainer.slow_rank_factor` times the median of the other ranks, naming it, its host and the figures.

What is timed (`ComputeClock`): from the start of a step to the start of its last backward pass. DDP begins
reducing gradients in that backward pass, and nothing before it waits for another rank (the data is loaded
before the step starts): the time is this rank's own forward passes, and with gradient accumulation its
earlier backward passes too. A fast rank waits for a slow one inside the last backward pass, so its step
takes as long but its compute does not. (DDP's broadcast of buffers at the start of a forward pass is a
collective inside the window, but the ranks reach it together: they left the previous step's all-reduce
together.) On CUDA two events per step time the device's work without waiting
for it; they are read at the log interval, when the logged loss synchronizes anyway.

Only with parallel.strategy=ddp: an FSDP forward pass gathers parameters from every rank (the waiting would
be timed as compute), and pipeline stages differ in work by design.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from jobs import parallel

MIN_STEPS = 5  # a shorter window is added to the next one: the time of one or two steps is mostly noise
# below this much extra compute per step a ratio is noise of a loaded machine (a tiny model on a shared CPU)
MIN_EXCESS_S = 0.01


@dataclass(frozen=True)
class SlowRank:
    """A rank slower than the others over steps first..last (its figures per step)."""

    rank: int
    host: str
    seconds: float  # its compute time per step
    others: float  # the median of the other ranks'
    first: int
    last: int

    @property
    def ratio(self) -> float:
        return self.seconds / self.others if self.others > 0 else float("inf")

    def line(self) -> str:
        return (f"slow rank: rank {self.rank} on {self.host} takes {self.ratio:.1f}x the median compute time per "
                f"step of the other ranks ({_time(self.seconds)} vs {_time(self.others)}) over steps "
                f"{self.first}-{self.last}")


def _time(seconds: float) -> str:
    """0.084 s, or 0.36 ms: a fast rank's figure is not rounded to 0.000 s."""
    return f"{seconds:.3f} s" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def find_slow(per_step: Sequence[float], steps: int, factor: float) -> list[tuple[int, float, float]]:
    """(rank, its seconds, the other ranks' median) for every rank whose compute time per step is more than
    `factor` times the median of the others' and at least MIN_EXCESS_S above it. The median of the *others*:
    with two ranks, one twice as slow is 1.33x the median of both, and a slow rank must not lift its own bar.
    Nothing with one rank, fewer than MIN_STEPS steps, or factor 0 (the report is off)."""
    if factor <= 0 or len(per_step) < 2 or steps < MIN_STEPS:
        return []
    found = []
    for rank, seconds in enumerate(per_step):
        others = statistics.median([s for r, s in enumerate(per_step) if r != rank])
        if seconds > factor * others and seconds - others >= MIN_EXCESS_S:
            found.append((rank, seconds, others))
    return found


class ComputeClock:
    """This rank's compute time: `start()` when a step starts, `mark()` where its last backward pass starts;
    `take()` returns the seconds timed since the previous take()."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._started = 0.0
        self._start_event: Optional[torch.cuda.Event] = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._started = time.perf_counter()

    def mark(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end))
        else:
            self.seconds += time.perf_counter() - self._started

    def take(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class SlowRankReport:
    """The clock of this rank and the exchange at log intervals. Every rank calls exchange() at the same
    steps (the window closes at the same step count everywhere, so the collective always matches)."""

    def __init__(self, factor: float, device: torch.device, step: int) -> None:
        self.factor, self.clock, self.since = factor, ComputeClock(device), step
        self._hosts: Optional[list[str]] = None

    def exchange(self, step: int) -> Optional[tuple[list[float], list[SlowRank]]]:
        """Each rank's compute seconds per step since the last exchange and the slow ranks among them; None
        (and no collective) while the window is shorter than MIN_STEPS: it goes on into the next interval."""
        steps = step - self.since
        if steps < MIN_STEPS:
            return None
        per_step = parallel.gather_values(self.clock.take() / steps)
        if self._hosts is None:
            self._hosts = parallel.host_names()  # once per launch
        first, self.since = self.since + 1, step
        slow = [SlowRank(rank, self._hosts[rank], seconds, others, first, step)
                for rank, seconds, others in find_slow(per_step, steps, self.factor)]
        return per_step, slow
