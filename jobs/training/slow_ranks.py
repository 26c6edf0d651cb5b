"""The slow-rank report: a rank on a sick node that computes at half speed, or waits for its data on a slow
disk or mount, slows every rank of a synchronous run, and nothing else says so. Each rank splits its own step
time three ways; every log interval the ranks exchange three numbers each (one small all-gather on the host
gloo group), and rank 0 warns about a rank slower than `trainer.slow_rank_factor` times the median of the
other ranks, naming it, its host, where its time goes and the figures.

What is timed (`StepClock`), per step:
- compute: from the start of a step to the start of its last backward pass. DDP begins reducing gradients in
  that backward pass, and nothing before it waits for another rank: the time is this rank's own forward
  passes, and with gradient accumulation its earlier backward passes too. (DDP's broadcast of buffers at the
  start of a forward pass is a collective inside the window, but the ranks reach it together: they left the
  previous step's all-reduce together.)
- data: how long this rank's data loader took to hand over the step's batches (its next()). Only that call
  is timed, not the whole gap since the previous step: evaluations, checkpoints and log lines between steps
  are not waiting for data.
- sync: from the start of the last backward pass to the end of the optimizer step: the last backward, the
  gradient all-reduce, where a fast rank waits for a slow one, and the optimizer.
The slow decision is on compute (a slow rank computes more; the fast ones wait in sync, so sync says who
waits, not who is slow) and on data (a rank that waits longer for its batches arrives late at the
all-reduce). On CUDA events time compute and sync on the device without waiting for it; they are read at
the log interval, when the logged loss synchronizes anyway. On the CPU it is four clock reads a step.

Only with parallel.strategy=ddp: an FSDP forward pass gathers parameters from every rank (the waiting would
be timed as compute), and pipeline stages differ in work by design.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, TypeVar

import torch

from jobs import parallel

MIN_STEPS = 5  # a shorter window is added to the next one: the time of one or two steps is mostly noise
# below this much extra time per step a ratio is noise of a loaded machine (a tiny model on a shared CPU)
MIN_EXCESS_S = 0.01
# the figures a rank is judged on, and how its warning says which (sync is not one: see the docstring)
KINDS = {"compute": "takes {ratio}x the median compute time per step",
         "data": "waits {ratio}x the median time for data per step"}

T = TypeVar("T")


@dataclass(frozen=True)
class StepSplit:
    """One rank's seconds per step over a window, in the three parts StepClock times."""

    compute: float
    data: float
    sync: float

    def line(self) -> str:
        return (f"compute {_time(self.compute)}, waiting for data {_time(self.data)}, "
                f"in the last backward and collectives {_time(self.sync)}")


@dataclass(frozen=True)
class SlowRank:
    """A rank slower than the others over steps first..last: `seconds` is its `kind` figure per step,
    `others` the median of the other ranks', `split` where all of its step time went."""

    rank: int
    host: str
    kind: str  # a key of KINDS
    seconds: float
    others: float
    first: int
    last: int
    split: StepSplit

    @property
    def ratio(self) -> float:
        return self.seconds / self.others if self.others > 0 else float("inf")

    def line(self) -> str:
        what = KINDS[self.kind].format(ratio=f"{self.ratio:.1f}")
        return (f"slow rank: rank {self.rank} on {self.host} {what} of the other ranks ({_time(self.seconds)} vs "
                f"{_time(self.others)}) over steps {self.first}-{self.last}; its step: {self.split.line()}")


def _time(seconds: float) -> str:
    """0.084 s, or 0.36 ms: a fast rank's figure is not rounded to 0.000 s."""
    return f"{seconds:.3f} s" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def _above(values: Sequence[float], factor: float) -> list[tuple[int, float, float]]:
    """(rank, its value, the other ranks' median) for each value more than `factor` times the median of the
    others' and at least MIN_EXCESS_S above it. The median of the *others*: with two ranks, one twice as
    slow is 1.33x the median of both, and a slow rank must not lift its own bar."""
    found = []
    for rank, seconds in enumerate(values):
        others = statistics.median([s for r, s in enumerate(values) if r != rank])
        if seconds > factor * others and seconds - others >= MIN_EXCESS_S:
            found.append((rank, seconds, others))
    return found


def find_slow(per_rank: Sequence[StepSplit], steps: int, factor: float) -> list[tuple[int, str, float, float]]:
    """(rank, kind, its seconds, the other ranks' median) for every rank slow on compute or on data, by rank
    (compute first). Nothing with one rank, fewer than MIN_STEPS steps, or factor 0 (the report is off)."""
    if factor <= 0 or len(per_rank) < 2 or steps < MIN_STEPS:
        return []
    found = [(rank, kind, seconds, others) for kind in KINDS
             for rank, seconds, others in _above([getattr(split, kind) for split in per_rank], factor)]
    return sorted(found, key=lambda hit: hit[0])  # stable: a rank's compute before its data


class StepClock:
    """This rank's step time in three parts. `batches()` wraps the loader and notes when the rank asks for
    a step's batches; `start()` when the step starts (the wait since is data), `mark()` where its last
    backward pass starts, `end()` after the optimizer step; `take()` returns the StepSplit totals timed
    since the previous take()."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.compute = self.data = self.sync = 0.0
        self._asked: Optional[float] = None  # when the loader was asked for the coming step's batches
        self._started = self._marked = 0.0
        self._start_event: Optional[torch.cuda.Event] = None
        self._mark_event: Optional[torch.cuda.Event] = None
        self._compute_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._sync_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def batches(self, steps: Iterable[T]) -> Iterator[T]:
        """`steps`, noting when each is asked for (a loop, not a for: the read must come before next())."""
        it = iter(steps)
        while True:
            self._asked = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            yield item

    def start(self) -> None:
        now = time.perf_counter()
        if self._asked is not None:  # a step redone after an out-of-memory error waited for nothing
            self.data += now - self._asked
            self._asked = None
        if self.cuda:
            self._start_event = _record()
        else:
            self._started = now

    def mark(self) -> None:
        if self.cuda:
            self._mark_event = _record()
            self._compute_events.append((self._start_event, self._mark_event))
        else:
            self._marked = time.perf_counter()
            self.compute += self._marked - self._started

    def end(self) -> None:
        if self.cuda:
            self._sync_events.append((self._mark_event, _record()))
        else:
            self.sync += time.perf_counter() - self._marked

    def take(self) -> StepSplit:
        if self._compute_events or self._sync_events:
            (self._sync_events or self._compute_events)[-1][1].synchronize()  # recorded last
            self.compute += _elapsed(self._compute_events)
            self.sync += _elapsed(self._sync_events)
            self._compute_events, self._sync_events = [], []
        split = StepSplit(self.compute, self.data, self.sync)
        self.compute = self.data = self.sync = 0.0
        return split


def _record() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed(pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    return sum(a.elapsed_time(b) for a, b in pairs) / 1000.0


class SlowRankReport:
    """The clock of this rank and the exchange at log intervals. Every rank calls exchange() at the same
    steps (the window closes at the same step count everywhere, so the collective always matches)."""

    def __init__(self, factor: float, device: torch.device, step: int) -> None:
        self.factor, self.clock, self.since = factor, StepClock(device), step
        self._hosts: Optional[list[str]] = None

    def exchange(self, step: int) -> Optional[tuple[list[StepSplit], list[SlowRank]]]:
        """Each rank's seconds per step since the last exchange and the slow ranks among them; None (and no
        collective) while the window is shorter than MIN_STEPS: it goes on into the next interval."""
        steps = step - self.since
        if steps < MIN_STEPS:
            return None
        mine = self.clock.take()
        every = parallel.gather_values([mine.compute / steps, mine.data / steps, mine.sync / steps])
        per_rank = [StepSplit(*values) for values in every]
        if self._hosts is None:
            self._hosts = parallel.host_names()  # once per launch
        first, self.since = self.since + 1, step
        slow = [SlowRank(rank, self._hosts[rank], kind, seconds, others, first, step, per_rank[rank])
                for rank, kind, seconds, others in find_slow(per_rank, steps, self.factor)]
        return per_rank, slow
