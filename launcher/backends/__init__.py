"""Backends start, follow and stop runs. The cluster config names one (`backend:`); nothing is
auto-detected. Each backend is one module implementing `base.Backend` (check, check_many, launch,
launch_many, status, live, cancel, wait), registered by name in `BACKENDS`.

Adding a backend (e.g. cloud VMs) is one new module here plus one line in `BACKENDS` (and its config
section in `jobs/schema/cluster.py`); no other code names a backend. A run's own backend is the one its
run.json records, so `status`/`cancel` follow a run whatever cluster config the command was given.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

from launcher.backends.base import Backend
from launcher.plot import latest_rates
from jobs.schema.run_dir import Run, RunInfo
from jobs.schema.errors import UsageError

# name (as in cluster configs and run.json) -> module; imported on first use, so a backend's own
# dependencies (submitit, a cloud SDK) are only loaded where it is used
BACKENDS = {
    "local": "launcher.backends.local",
    "slurm": "launcher.backends.slurm",
    "vms": "launcher.backends.vms",
}
_PROC = Path("/proc/self/stat").exists()  # Linux: process start times are known, so pids can be checked


def get(name: str) -> Backend:
    """The backend called `name` (a cluster config's `backend:`, or the one a run.json records)."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", hint=f"use one of {', '.join(sorted(BACKENDS))}")
    return cast(Backend, importlib.import_module(BACKENDS[name]))


def of_run(run: Run) -> Backend:
    """The backend that launched `run`; local where run.json is missing or unreadable (`problems()` says why)."""
    return get(run.info().backend or "local")


def status(run: Run) -> dict[str, Any]:
    """`launcher status`: the run's backend's view, plus why run.json or result.json cannot be read."""
    problems, info, out = run.problems(), run.info(), of_run(run).status(run)
    if info.exit_code and out["state"] in ("failed", "stopped", "preempted", "cancelled"):  # the run's, as it exited
        out["exit_code"] = info.exit_code
    if info.attempt:  # `launcher run`: which start of the script this is, and whether it resumed
        out["script_start"] = f"{info.attempt} ({'resumed earlier progress' if info.resuming else 'fresh'})" \
            if info.attempt > 1 else "1"
    if info.restart_note:
        out["warning"] = info.restart_note
    if info.slow_rank:  # rank 0's newest slow-rank warning (jobs.training.slow_ranks)
        out["slow_rank"] = info.slow_rank
    rates = latest_rates(run.dir)  # the newest log line's throughput, MFU and peak memory
    if rates:
        out["throughput"] = rates
    return {**out, **({"note": "; ".join(problems)} if problems else {})}


def refuse_if_running(run: Run) -> None:
    """UsageError naming the live process or job if `run` is running (or queued): a second launch
    must not rewrite its directory under it."""
    if not run.info():
        return
    what = of_run(run).live(run)
    if what:
        raise UsageError(f"run {run.name} is already {what}", hint=f"wait for it, stop it with "
                         f"`launcher cancel {run.name}`, or choose another --run-name")


def cancel(run: Run) -> str:
    return of_run(run).cancel(run)


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None where
    unknown or once the process has ended (a zombie not yet reaped). A pid is reused after its process
    ends; the pair (pid, start) names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces and ')'
    return None if fields[0] in ("Z", "X") else int(fields[19])  # fields[0] is field 3, the state


def run_process(info: RunInfo, pid_key: str, start_key: str) -> Optional[int]:
    """The pid in run.json under `pid_key` if that process is alive and is still the one the launcher
    recorded (same start time); None otherwise."""
    pid = getattr(info, pid_key)
    if not isinstance(pid, int) or pid <= 0:  # 0 and -1 would signal a process group or every process
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process that reused the pid
        return None
    if not _PROC:
        return pid  # no start times on this system: trust the pid
    start = process_start(pid)
    return pid if start is not None and start == getattr(info, start_key) else None


if TYPE_CHECKING:  # a type checker verifies that every registered module implements the protocol
    from launcher.backends import local, slurm, vms

    _IMPLEMENTATIONS: tuple[Backend, ...] = (local, slurm, vms)
