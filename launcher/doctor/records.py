"""A run directory read for diagnosis: each rank's log from its last launch (logs are appended to by every
launch), the Slurm job's own output, run.json, result.json and the resolved config, with line numbers."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from launcher.doctor.findings import Line
from jobs.schema.run_dir import CLUSTER_YAML, CONFIG_YAML, FAILURES, LOGS, STACKS, Run, RunInfo, RunResult
from jobs.flight_recorder import last_collective
from jobs.schema.run_files import NotRegularFile, load_record, open_regular

# The first line a rank writes at every launch: jobs.train's "rank 0 of 2 on HOST" and jobs.script's
# "launcher: rank 0 of 2 on HOST". The last one in a log starts the launch being diagnosed.
LAUNCH_START = re.compile(r"(?:INFO jobs\.train: |^launcher: )rank \d+ of \d+ on ")
# jobs.train's format: "19:39:12 [rank0] ERROR jobs.train: message"
LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d) \[rank(\d+)\] ([A-Z]+) ([\w.]+): ")
RANK_LOG = re.compile(r"^rank(\d+)\.log$")
RANK_DUMP = re.compile(r"^rank(\d+)\.txt$")
MAX_READ = 8 << 20  # bytes read from the end of one file: a week-long run's log is not read whole
MAX_LINES = 100_000  # and of those, the lines kept: 8 MiB of one-character lines would take the rules minutes


@dataclass(frozen=True)
class RankLog:
    rank: int
    lines: tuple[Line, ...]  # the last launch's, numbered as in the file


@dataclass(frozen=True)
class RunRecords:
    """Everything the diagnosis looks at; `recipe` and `cluster` are the YAML as written ({} if unreadable)."""

    name: str
    info: RunInfo = field(default_factory=RunInfo)
    result: RunResult = field(default_factory=RunResult)
    recipe: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)
    ranks: tuple[RankLog, ...] = ()
    job_output: tuple[Line, ...] = ()  # the Slurm job's output files and failure records
    unread: tuple[str, ...] = ()  # "logs/rank0.log: not a regular file (a FIFO)": files skipped, and why
    stacks: dict = field(default_factory=dict)  # rank -> its stack in the newest dump (logs/stacks/<time>/)
    stacks_dir: str = ""  # that dump's folder, relative to the run directory
    # rank -> (sequence number, operation, state) of its newest collective, from the flight recorder's record
    # beside its stack in that folder (jobs.flight_recorder)
    collectives: dict = field(default_factory=dict)

    def lines(self) -> Iterator[Line]:
        for log in self.ranks:
            yield from log.lines
        yield from self.job_output

    @property
    def ended_well(self) -> bool:
        """Completed, or stopped on purpose: an error a log holds then is one the run survived (or a Ctrl-C's)."""
        return self.info.state in ("completed", "cancelled", "preempted") and self.info.failed_rank is None

    def setting(self, section: str, key: str) -> Any:
        """recipe[section][key], or None where the config lacks it."""
        value = self.recipe.get(section)
        return value.get(key) if isinstance(value, dict) else None


def read_run(run: Run) -> RunRecords:
    unread = run.problems()  # run.json or result.json damaged: said, not taken for "no record"
    ranks = tuple(_rank_logs(run.dir, unread))
    stacks_dir, stacks = _newest_stacks(run.dir, unread)
    collectives = _newest_collectives(run.dir / stacks_dir) if stacks_dir else {}
    return RunRecords(name=run.name, info=run.info(), result=run.result(), recipe=run.written_config(CONFIG_YAML),
                      cluster=run.written_config(CLUSTER_YAML), ranks=ranks,
                      job_output=tuple(_job_output(run, unread)), unread=tuple(unread), stacks=stacks,
                      stacks_dir=stacks_dir, collectives=collectives)


FLIGHT_RECORD_MAX = 64 << 20  # a record of 2000 collectives per group is well under a MiB


def _newest_collectives(folder: Path) -> dict[int, tuple]:
    """rank -> its newest collective, from each `flight-rank<N>.json` a rank wrote on a hang; a record that
    cannot be read is left out (the stacks still say where the rank was)."""
    found = {}
    for path in sorted(folder.glob("flight-rank*.json")):
        rank = path.name[len("flight-rank"):-len(".json")]
        try:
            newest = last_collective(load_record(path, FLIGHT_RECORD_MAX)) if rank.isdigit() else None
        except (OSError, ValueError, TypeError, AttributeError):
            newest = None
        if newest is not None:
            found[int(rank)] = newest
    return found


def _newest_stacks(run_dir: Path, unread: list[str]) -> tuple[str, dict[int, str]]:
    """The newest folder of stack dumps (`launcher stacks`, the hang watchdog): its path and rank -> text."""
    try:
        dumps = [p for p in (run_dir / LOGS / STACKS).iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return "", {}
    if not dumps:
        return "", {}
    newest = max(dumps, key=lambda p: (p.stat().st_mtime, p.name))
    shown = str(newest.relative_to(run_dir))
    texts = {int(m.group(1)): "\n".join(line.text for line in read_lines(p, f"{shown}/{p.name}", unread))
             for p in sorted(newest.glob("rank*.txt")) if (m := RANK_DUMP.match(p.name))}
    return shown, texts


def _rank_logs(run_dir: Path, unread: list[str]) -> Iterator[RankLog]:
    found = sorted((int(m.group(1)), p) for p in (run_dir / LOGS).glob("rank*.log") if (m := RANK_LOG.match(p.name)))
    for rank, path in found:
        lines = read_lines(path, f"{LOGS}/{path.name}", unread)
        starts = [i for i, line in enumerate(lines) if LAUNCH_START.search(line.text)]
        yield RankLog(rank, tuple(lines[starts[-1]:] if starts else lines))


def _job_output(run: Run, unread: list[str]) -> Iterator[Line]:
    """The current Slurm job's output (submitit's or an sbatch script's) and its ranks' failure records."""
    info = run.info()
    paths: list[Path] = []
    if info.submitit_folder and info.job_id:
        paths += sorted(Path(info.submitit_folder).glob(f"{info.job_id}_*_log.*"))
    if info.job_id:
        paths += [run.dir / f"slurm-{info.job_id}.out"]
        paths += sorted((run.dir / FAILURES).glob(f"{info.job_id}.*.rank*"))
    for path in paths:
        try:
            shown = str(path.relative_to(run.dir))
        except ValueError:
            shown = str(path)
        yield from read_lines(path, shown, unread)


def read_lines(path: Path, shown: str, unread: list[str]) -> list[Line]:
    """The file's lines (its last MAX_READ bytes) numbered as in the file; [] if it cannot be read, and
    `unread` says why where it is no regular file (a FIFO would block, /dev/zero never ends). A log is
    what a process wrote, not necessarily UTF-8: undecodable bytes read as U+FFFD."""
    try:
        with open_regular(path) as f:
            size = f.seek(0, 2)
            skipped = max(0, size - MAX_READ)
            first = _count_lines(f, skipped) + 1
            f.seek(skipped)
            data = f.read(MAX_READ)  # a file that grows while it is read is still read only this far
    except NotRegularFile as err:
        unread.append(f"{shown}: {err}")
        return []
    except OSError:
        return []
    text = data.decode(errors="replace").splitlines()
    first, text = first + max(0, len(text) - MAX_LINES), text[-MAX_LINES:]
    return [Line(shown, first + i, line) for i, line in enumerate(text)]


def _count_lines(f: Any, upto: int) -> int:
    f.seek(0)
    count, left = 0, upto
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def log_time(line: Line) -> Optional[str]:
    """HH:MM:SS of a jobs.train log line, else None (a script's own output has no time)."""
    m = LOG_LINE.match(line.text)
    return m.group(1) if m else None


def log_level(line: Line) -> Optional[str]:
    m = LOG_LINE.match(line.text)
    return m.group(3) if m else None
