"""Slurm job states, for many jobs at once: one `sacct` call (and one `squeue` call) per refresh.

Like submitit's watcher, `SlurmWatcher` asks about every job it is given in one call and keeps the
answer for a moment, so a sweep's table or a wait over many trials costs two commands per poll,
not two per trial. It always asks about whole job arrays (`sacct -j 15` lists every element), since
`sacct -j 15_0` returns nothing for an element cancelled (or failed) while still pending: sacct keeps
such elements as one row, `15_[0-3%4]`. squeue fills in what accounting has not seen yet (it lags
behind a fresh submission).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

from jobs.schema.errors import UsageError
from jobs.schema.run_dir import Run

# Slurm states after which a job runs no more (unless rank 0 is requeueing it: see `wait_for_runs`)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
UNKNOWN = "UNKNOWN"  # neither sacct nor squeue knows the job (yet, or any more)


def array_of(job_id: str) -> str:
    """`15_3` -> `15` (the whole array); a plain job id is its own array."""
    return job_id.split("_")[0]


def expand_job_ids(job: str) -> list[str]:
    """sacct's array notation -> element ids: `15_[0-2,5%4]` -> 15_0 15_1 15_2 15_5; `9_1` -> 9_1."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    ids = []
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        ids += [f"{match.group(1)}_{i}" for i in range(int(first), int(last or first) + 1)]
    return ids


def read_states(arrays: Sequence[str]) -> dict[str, str]:
    """Job or element id -> Slurm state (`CANCELLED by 0` -> CANCELLED) of every job in `arrays`."""
    joined = ",".join(arrays)
    out: dict[str, str] = {}
    rows = _output(["sacct", "-j", joined, "-X", "-n", "-P", "-o", "JobID,State"], required=True)
    for row in rows:  # a requeued job may have several rows: the last one is the current start
        job, _, state = row.partition("|")
        for element in expand_job_ids(job.strip()):
            out[element] = (state.split() or [UNKNOWN])[0]
    queued = _output(["squeue", "-h", "-r", "-j", joined, "-o", "%i|%T"], required=False)
    for row in queued:
        job, _, state = row.partition("|")
        job, state = job.strip(), state.strip() or UNKNOWN
        # accounting lags behind the controller: a job sacct still calls PENDING may be running by now
        if out.get(job, "PENDING") == "PENDING":
            out[job] = state
    return out


def _output(command: list[str], required: bool) -> list[str]:
    """The lines a Slurm command prints. Without sacct no job's state can be known: say so in one line.
    squeue only fills in what accounting has not seen yet: where it is missing, there is nothing to add."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.splitlines()
    except FileNotFoundError:
        if required:
            raise UsageError(f"{command[0]} is not on PATH: Slurm job states cannot be read here",
                             hint="run this where Slurm's commands are (a login node), or add them to PATH") from None
        return []


class SlurmWatcher:
    """The states of the jobs it was asked about, refreshed together at most every `max_age_s`."""

    def __init__(self, max_age_s: float = 1.0, reader: Callable[[Sequence[str]], dict[str, str]] = read_states):
        self.max_age_s = max_age_s
        self._read = reader
        self._arrays: set[str] = set()  # every array asked about so far: each refresh covers them all
        self._states: dict[str, str] = {}
        self._read_at = -float("inf")

    def states(self, job_ids: Iterable[str], max_age_s: float | None = None) -> dict[str, str]:
        """Job id -> Slurm state (UNKNOWN where neither sacct nor squeue knows it)."""
        wanted = list(job_ids)
        arrays = {array_of(job) for job in wanted}
        age = time.monotonic() - self._read_at
        if not arrays <= self._arrays or age > (self.max_age_s if max_age_s is None else max_age_s):
            self._arrays |= arrays
            self._states = self._read(sorted(self._arrays))
            self._read_at = time.monotonic()
        return {job: self._states.get(job, UNKNOWN) for job in wanted}

    def state(self, job_id: str) -> str:
        return self.states([job_id])[job_id]

    def forget(self, job_ids: Iterable[str]) -> None:
        """Stop asking about these jobs' arrays (they have ended)."""
        self._arrays -= {array_of(job) for job in job_ids}


WATCHER = SlurmWatcher()  # one per process: `status` of many trials shares its refreshes


def job_state(job_id: str) -> str:
    """Slurm's state of one job, read now."""
    return WATCHER.states([job_id], max_age_s=0)[job_id]


def wait_for_runs(runs: Sequence[Run], poll_s: float = 2.0, lost_after_s: float = 120.0,
                  watcher: SlurmWatcher = WATCHER) -> dict[str, str]:
    """Block until every run's job has stopped for good, requeues included: run name -> Slurm state.

    Rank 0 marks run.json "requeued" before `scontrol requeue`, and the job, briefly terminal in
    between, runs again and marks "running": a terminal state only counts without that mark. A job
    that neither sacct nor squeue knows for `lost_after_s` is given up as UNKNOWN."""
    by_name = {run.name: run for run in runs}
    jobs = {run.name: run.info().job_id or "" for run in runs}
    waiting = {name for name, job in jobs.items() if job}
    final = {name: UNKNOWN for name in jobs if name not in waiting}  # never submitted
    unknown_since: dict[str, float] = {}
    while waiting:
        states = watcher.states([jobs[name] for name in waiting], max_age_s=0)
        for name in sorted(waiting):
            state = states[jobs[name]]
            if state == UNKNOWN:
                if time.monotonic() - unknown_since.setdefault(name, time.monotonic()) > lost_after_s:
                    print(f"Slurm has no record of job {jobs[name]} (run {name}) after {lost_after_s:.0f} s; "
                          "no longer waiting for it", file=sys.stderr, flush=True)
                    final[name] = UNKNOWN
                    waiting.discard(name)
                continue
            unknown_since.pop(name, None)
            if state in TERMINAL and by_name[name].info().state != "requeued":
                final[name] = state
                waiting.discard(name)
        if waiting:
            time.sleep(poll_s)
    watcher.forget(jobs.values())
    return final
