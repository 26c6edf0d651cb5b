"""The hang watchdog and the restart budgets, torch-free and in the jobs plane so that every supervisor of ranks
runs the same: the local `launcher launch` process (launcher.backends.local), a Slurm job's batch step
(jobs.environments.slurm_supervise, which reads every node's reports from the shared run folder), and each
VM's node agent (jobs.environments.vms, which watches only its own node's ranks: `NodeWatchdog`) with the
run's supervisor on node 0 deciding (launcher.vms.supervise).

Hang: no live rank's progress (jobs.progress) has changed for `resilience.hang_timeout_s` (default
max(300 s, 20 x the slowest step any rank measured)). Progress is a new step report; before a rank's first
report (startup, a compile, a plain script that reports no steps) it is the rank's CPU time or its log
growing. A rank whose process has ended is not hung. Changes are timed on this process's own monotonic
clock, so nothing depends on the ranks' clocks. On a hang every rank's stack is dumped (jobs.stacks) into
`<run>/logs/stacks/hang-<attempt>/`, a line naming the hung ranks goes into `launcher logs`, and the
ranks are killed: a hung rank would never act on a polite SIGTERM, and the others wait on it.

Restarts inside the allocation are counted per kind ("hangs", "crashes") in run.json's
`inplace_restarts`, each against its own budget (resilience.max_hang_restarts / max_crash_restarts)."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from jobs import flight_recorder, stacks
from jobs.progress import Report
from jobs.schema.resilience import ResilienceConfig, hang_timeout
from jobs.schema.run_dir import CHECKPOINTS, LOGS, PROGRESS, RESULT_JSON, Run, RunInfo, committed_steps

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
        """A rank that has not reported yet counts as alive (torchrun is starting it); an ended one does not.
        A rank on another node counts as alive: its pid means nothing here, and srun ends the step when
        one of its ranks fails (Slurm, whose supervisor reads every node's reports from the shared run folder)."""
        report = self.reports.get(rank)
        return report is None or report.host not in ("", socket.gethostname()[:64]) or \
            (_PROC / str(report.pid)).exists() and not _zombie(report.pid)


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


# ----------------------------------------------------------------------------- ending an attempt, restart budgets
KINDS = {"hangs": "max_hang_restarts", "crashes": "max_crash_restarts"}  # kind -> its budget's key


def end_hung_attempt(run: Run, watchdog: Watchdog, hang: Hang, root: int, attempt: int) -> None:
    """Dump every rank's stack, say which ranks hung, then kill the attempt's whole process tree."""
    dest = run.stacks_dir(attempt)
    with flight_recorder.recording(run.dir, dest):  # each rank's last collectives beside its stack
        stacks.dump(watchdog.pids(), dest)
    run.note(f"{hang.line()}; stacks of every rank in {dest.relative_to(run.dir)}/")
    for pid in [*descendants(root), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def budget_left(cfg: ResilienceConfig, counts: dict, kind: str) -> tuple[bool, int]:
    """Whether one more restart of `kind` is allowed after `counts` so far, and the limit."""
    limit = getattr(cfg, KINDS[kind])
    return counts.get(kind, 0) < limit, limit


def restart_or_stop(run: Run, cfg: ResilienceConfig, kind: str, why: str,
                    note: Optional[Callable[[str], None]] = None) -> tuple[bool, Optional[str]]:
    """Count a restart of `kind` and prepare it (True), or, past its budget, record why the run stops
    (False). The line said comes back too; None for a crash with no budget asked for, which the backend
    handles as it always did (locally the run fails; on VMs a failure, relaunched within vms.max_failures).
    `note` puts a line into `launcher logs` (default: rank 0's log in `run`)."""
    note = note or run.note
    counts = dict(run.info().inplace_restarts)
    allowed, limit = budget_left(cfg, counts, kind)
    event = "hung" if kind == "hangs" else "crashed"
    if not allowed:
        if kind == "crashes" and limit == 0:
            return False, None
        message = f"not restarted: {kind} limit of {limit} reached (resilience.{KINDS[kind]}); last: {why}"
        run.update(inplace_stop=message)
        note(f"{event}; {message}")
        return False, message
    counts[kind] = counts.get(kind, 0) + 1
    steps = committed_steps(run.dir / CHECKPOINTS)
    start = f"checkpoint step-{steps[-1]}" if steps else "the newest committed checkpoint, if any"
    # the restart continues the run whatever --resume said: it is the same launch, started again
    run.update(inplace_restarts=counts, resume="auto", state="restarting", remove=("exit_code", "failed_rank"))
    (run.dir / RESULT_JSON).unlink(missing_ok=True)  # the failed attempt's
    line = f"{event} ({why}); restarting every rank in place from {start} ({kind} {counts[kind]}/{limit})"
    note(line)
    return True, line


def status_fields(info: RunInfo, live: bool) -> dict[str, Any]:
    """What `launcher status` shows of the restarts inside the allocation on any backend: the count by kind,
    and, once the run has ended, why it was not restarted again."""
    history = {"restarts": ", ".join(f"{kind} {n}" for kind, n in info.inplace_restarts.items())} \
        if info.inplace_restarts else {}
    stopped = {"stop_reason": info.inplace_stop} if info.inplace_stop and not live else {}
    return {**history, **stopped}


def restart_in_place(run: Run, cfg: ResilienceConfig, kind: str, why: str) -> bool:
    """`restart_or_stop`, with its line also on the supervisor's stderr (the console, or the job's output)."""
    restart, line = restart_or_stop(run, cfg, kind, why)
    if line is not None:
        print(f"run {run.name}: {line}" if restart else line, file=sys.stderr, flush=True)
    return restart
