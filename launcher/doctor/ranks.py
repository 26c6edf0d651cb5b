"""Which rank stopped first in a failed launch, read from the ranks' logs, and the line helpers the rules share."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from launcher.doctor.findings import Line
from launcher.doctor.records import RankLog, RunRecords, log_level, log_time
from launcher.doctor.tracebacks import content

EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b(?::|$)")
# A rank's error that only says another rank is gone or late: not where the trouble began.
SECONDARY = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting \d+ ?ms|"
                       r"Watchdog caught collective operation timeout|remote process exited or there was a network "
                       r"error|NCCL communicator was aborted|ncclRemoteError|Socket Timeout|timed out after \d+")
OUTCOME = re.compile(r"INFO jobs\.trainer: (?:completed|preempted|pruned) at step \d+")


@dataclass(frozen=True)
class RankEnd:
    """How one rank's last launch ended, read from its log."""

    rank: int
    error: Optional[Line]  # the first fatal error it logged
    last: Optional[Line]  # its log's last line
    finished: bool  # it logged an outcome (completed, preempted, pruned)

    @property
    def secondary(self) -> bool:
        return self.error is not None and bool(SECONDARY.search(self.error.text))


def rank_end(log: RankLog) -> RankEnd:
    error = next((line for line in log.lines if _fatal(line)), None)
    return RankEnd(log.rank, error, log.lines[-1] if log.lines else None,
                   any(OUTCOME.search(line.text) for line in log.lines))


def _fatal(line: Line) -> bool:
    """jobs.train's "rank failed: ..." line, or the last line of a traceback in a script's output."""
    level = log_level(line)
    if level is not None:
        return level in ("ERROR", "CRITICAL") and "jobs.train: rank failed:" in line.text
    return bool(EXCEPTION.match(content(line)))  # whatever prefixes it carries ("[rank1]: ValueError: ...")


@dataclass(frozen=True)
class FirstStop:
    """The rank(s) that stopped first and how: "error" (an error of its own), "silent" (its log just ends:
    killed or hung) or "secondary" (every rank only reported losing the others)."""

    ranks: tuple[int, ...]
    how: str
    lines: tuple[Line, ...]

    def named(self) -> str:
        return f"rank {self.ranks[0]}" if len(self.ranks) == 1 else "ranks " + ", ".join(map(str, self.ranks))


def first_stop(records: RunRecords) -> Optional[FirstStop]:
    """Which rank stopped first in a failed launch: the first to report an error of its own (earliest time;
    ranks within the same second are named together), else the ranks whose log ends without any error
    while others failed, else the first to report losing the others."""
    ends = [rank_end(log) for log in records.ranks]
    if records.info.failed_rank is not None:  # `launcher run`: the first rank whose script failed said so
        end = next((e for e in ends if e.rank == records.info.failed_rank), None)
        return FirstStop((records.info.failed_rank,), "error", (end.error,) if end and end.error else ())
    primary = [e for e in ends if e.error is not None and not e.secondary]
    if primary:
        return _earliest(primary, "error")
    failed = any(e.error for e in ends) or records.info.state == "failed"
    silent = [e for e in ends if e.error is None and not e.finished and e.last is not None]
    if failed and silent and len(silent) < len(ends):
        return FirstStop(tuple(e.rank for e in silent), "silent", tuple(e.last for e in silent if e.last))
    secondary = [e for e in ends if e.secondary]
    return _earliest(secondary, "secondary") if secondary else None


def _earliest(ends: Sequence[RankEnd], how: str) -> FirstStop:
    times = {e.rank: (log_time(e.error) or "") if e.error else "" for e in ends}
    first = min(times.values())
    chosen = [e for e in ends if times[e.rank] == first]
    return FirstStop(tuple(e.rank for e in chosen), how, tuple(e.error for e in chosen if e.error))


def lines_matching(records: RunRecords, pattern: re.Pattern) -> list[Line]:
    """Every line of the last launch's records that `pattern` matches."""
    return [line for line in records.lines() if pattern.search(line.text)]


def rank_of(line: Line) -> str:
    """"rank N" for a line of rank N's log."""
    m = re.search(r"rank(\d+)", line.path)
    return f"rank {m.group(1)}" if m else "another rank"


def on_rank(line: Line) -> str:
    """" on rank N" for a line of rank N's log, to append to a sentence."""
    m = re.search(r"rank(\d+)", line.path)
    return f" on rank {m.group(1)}" if m else ""
