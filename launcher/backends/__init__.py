"""Backends start ranks. Each is one module with `check(recipe, cluster)` (raise UsageError
before anything starts) and `launch(recipe, cluster, run) -> exit code`; the cluster config
names the backend, nothing is auto-detected."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from schema import ClusterConfig
from schema.errors import UsageError
from schema.run_dir import Run, RunInfo, RunResult

# Slurm states (as `status` reports them) of a job that still runs or will run again
LIVE_SLURM_STATES = {"running", "pending", "requeued", "submitted", "configuring", "completing", "suspended",
                     "requeue_hold", "requeue_fed", "resizing", "signaling", "stage_out"}
_PROC = Path("/proc/self/stat").exists()  # Linux: process start times are known, so pids can be checked


def get(cluster: ClusterConfig) -> ModuleType:
    if cluster.backend == "slurm":
        from launcher.backends import slurm

        return slurm
    from launcher.backends import local

    return local


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


def status(run: Run) -> dict[str, Any]:
    info = run.info()
    if info.backend == "slurm":
        from launcher.backends import slurm

        return {**slurm.status(run), **_notes(run)}
    result = run.result()
    pid = run_process(info, "pid", "pid_start")
    if pid:
        state = "running"
    elif result:
        state = result.outcome
    elif run.problems():
        state = "unknown"
    else:
        state = "failed" if info.launches else "unknown"
    running = {"pid": pid} if pid else {}
    return {"run": run.name, "state": state, "backend": "local", "dir": str(run.dir), **running,
            **_summary(result), **_notes(run)}


def _notes(run: Run) -> dict[str, Any]:
    problems = run.problems()
    return {"note": "; ".join(problems)} if problems else {}


def refuse_if_running(run: Run) -> None:
    """UsageError naming the live process or Slurm job if `run` is running (or queued): a second launch
    must not rewrite its directory under it."""
    info = run.info()
    if not info.run_name:
        return
    if info.backend == "slurm" and shutil.which("sacct") is None:
        raise UsageError(f"run {run.name} ({run.dir}) was submitted to Slurm as job {info.job_id}, and "
                         "without `sacct` on PATH this machine cannot tell whether it still runs", hint="launch it "
                         "from the Slurm login node, or choose another --run-name")
    state = status(run)
    if state["state"] == "running" and state.get("pid"):
        raise UsageError(f"run {run.name} is already running (pid {state['pid']}, {run.dir})", hint=f"wait for it, "
                         f"stop it with `launcher cancel {run.name}`, or choose another --run-name")
    if state.get("backend") == "slurm" and state["state"] in LIVE_SLURM_STATES:
        raise UsageError(f"run {run.name} is already {state['state']} as Slurm job {state.get('job_id')} "
                         f"({run.dir})", hint=f"wait for it, stop it with `launcher cancel {run.name}`, "
                         "or choose another --run-name")


def cancel(run: Run) -> str:
    info = run.info()
    if info.backend == "slurm":
        from launcher.backends import slurm

        return slurm.cancel(run)
    pid = run_process(info, "launcher_pid", "launcher_start") or run_process(info, "pid", "pid_start")
    if not pid:
        return f"run {run.name} is not running"
    os.kill(pid, signal.SIGTERM)  # the ranks save a checkpoint, then exit
    return f"sent SIGTERM to run {run.name} (pid {pid}); it saves a checkpoint and stops"


def _summary(result: RunResult) -> dict[str, Any]:
    flat = {k: v for k, v in result.to_dict().items() if v is not None}
    return {k: v for k, v in flat.items() if k in ("step", "epoch", "val/acc", "val/loss", "signal")}
