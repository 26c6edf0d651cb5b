"""The hang watchdog's core, torch-free and in the jobs plane so that every supervisor of ranks can run it: the
local `launcher launch` process (launcher.watchdog) and each VM's node agent (jobs.environments.vms, which
watches only its own node's ranks: `NodeWatchdog`).

Hang: no live rank's progress (jobs.progress) has changed for `resilience.hang_timeout_s` (default
max(300 s, 20 x the slowest step any rank measured)). Progress is a new step report; before a rank's first
report (startup, a compile, a plain script that reports no steps) it is the rank's CPU time or its log
growing. A rank whose process has ended is not hung. Changes are timed on this process's own monotonic
clock, so nothing depends on the ranks' clocks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from jobs.progress import Report
from jobs.schema.resilience import hang_timeout
from jobs.schema.run_dir import LOGS, PROGRESS, Run

_PROC = Path("/proc")


@dataclass(frozen=True)
class Hang:
    """What the watchdog found: the stalled ranks, for how long, and the timeout that made it a hang."""

    ranks: tuple[int, ...]
    stalled_s: float
    timeout_s: float
    steps: dict = field(default_factory=dict)  # rank -> last reported step (None: no step yet)

    def short(self) -> str:
        return f"no progress for {self.stalled_s:.0f} s on rank{'s' if len(self.ranks) > 1 else ''} " \
               f"{', '.join(map(str, self.ranks))}"

    def line(self) -> str:
        where = ", ".join(f"rank {r} at step {self.steps[r]}" if self.steps.get(r) is not None else
                          f"rank {r}: no step reported" for r in self.ranks)
        return (f"hang: no progress for {self.stalled_s:.0f} s (timeout {self.timeout_s:.0f} s) on "
                f"rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))} ({where}); "
                "their stacks say where each one waits")


@dataclass
class _Seen:
    signature: tuple
    since: float


class Watchdog:
    """Follows every rank's progress; `check()` (called every second or so) returns a Hang or None.

    A hang is an attempt in which no live rank made progress for the timeout: in lock-step training one
    stuck rank stops every other at its next collective, and a rank still starting (importing, waiting
    at the rendezvous for a slow peer) is kept alive by its peers' progress. A rank stuck alone while the
    others compute is found once they have ended (ended ranks are not watched)."""

    def __init__(self, run: Run, ranks: int, setting: Optional[float], root: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.ranks, self.setting, self.root, self.clock = run, ranks, setting, root, clock
        self.seen: dict[int, _Seen] = {}
        self.reports: dict[int, Optional[Report]] = {}

    def check(self) -> Optional[Hang]:
        now = self.clock()
        for rank in self.watched():
            report = self.reports[rank] = Report.read(self.run.progress_file(rank))
            signature = self._signature(rank, report)
            seen = self.seen.get(rank)
            if seen is None or signature != seen.signature:
                self.seen[rank] = _Seen(signature, now)
        live = [r for r in sorted(self.seen) if self._alive(r)]
        limit = self.timeout()
        if not live or now - max(self.seen[r].since for r in live) < limit:
            return None
        return Hang(tuple(live), now - max(self.seen[r].since for r in live), limit,
                    {r: (self.reports.get(r) or Report(0)).step for r in live})

    def watched(self) -> Iterable[int]:
        """The ranks to follow: every rank of the run (one supervisor sees them all)."""
        return range(self.ranks)

    def timeout(self) -> float:
        slowest = max((r.slowest_s for r in self.reports.values() if r is not None), default=0.0)
        return hang_timeout(self.setting, slowest)

    def pids(self) -> dict[int, int]:
        """rank -> the pid doing its work: the one it reported, else (a rank stuck before its first report)
        the deepest process below torchrun whose environment names that rank."""
        found = rank_processes(self.root) if self.root and len(self.pids_reported()) < self.ranks else {}
        return {**found, **self.pids_reported()}

    def pids_reported(self) -> dict[int, int]:
        return {r: report.pid for r, report in self.reports.items() if report is not None}

    def _signature(self, rank: int, report: Optional[Report]) -> tuple:
        """What must change for the rank to have made progress: its step count once it reports steps,
        else its CPU time and its log (before it reported at all: the CPU time of every process started)."""
        log = _size(self.run.dir / LOGS / f"rank{rank}.log")
        if report is None:
            return ("starting", tree_ticks(self.root) if self.root else None, log)
        if report.beats:
            return ("steps", report.pid, report.beats)
        return ("alive", report.pid, cpu_ticks(report.pid), log)

    def _alive(self, rank: int) -> bool:
        """A rank that has not reported yet counts as alive (torchrun is starting it); an ended one does not."""
        report = self.reports.get(rank)
        return report is None or (_PROC / str(report.pid)).exists() and not _zombie(report.pid)


def tree_ticks(root: int) -> int:
    """CPU ticks of `root` and every process below it."""
    return sum(cpu_ticks(pid) or 0 for pid in [root, *descendants(root)])


def cpu_ticks(pid: int) -> Optional[int]:
    """User + system CPU time of process `pid` in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _zombie(pid: int) -> bool:
    try:
        return (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def descendants(root: int) -> list[int]:
    """Every process below `root` (torchrun starts its ranks in sessions of their own: a process-group
    signal would miss them), from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for stat in _PROC.glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def rank_processes(root: int) -> dict[int, int]:
    """rank -> pid from the RANK variable in the environment of `root` and the processes below it; a
    script's own process (below its rank's wrapper, same RANK) wins over the wrapper. One rank (no
    torchrun, no RANK): `root` is rank 0."""
    found = {0: root}
    for pid in descendants(root):  # parents come before their children
        try:
            environ = (_PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), b"")
        if rank.isdigit():
            found[int(rank)] = pid
    return found


class NodeWatchdog(Watchdog):
    """The ranks of one node only, for its node agent (VMs: each node has its own run folder, so it sees only
    its own ranks' progress files). Which of the run's ranks run here is learnt as they start: a progress
    file in this folder, or a process below torchrun (`root`) whose environment names its RANK. Before any
    rank has started (torchrun waits at the rendezvous) nothing is watched: the rendezvous has a timeout."""

    def __init__(self, run: Run, setting: Optional[float], root: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(run, 0, setting, root, clock)

    def watched(self) -> Iterable[int]:
        reported = {int(p.name[4:]) for p in (self.run.dir / PROGRESS).glob("rank*") if p.name[4:].isdigit()}
        return sorted(reported | set(self._started()) | set(self.seen))

    def pids(self) -> dict[int, int]:
        return {**self._started(), **self.pids_reported()}

    def _started(self) -> dict[int, int]:
        """rank -> pid of this node's rank processes (not torchrun itself, which names no rank)."""
        return {r: pid for r, pid in rank_processes(self.root).items() if pid != self.root} if self.root else {}

