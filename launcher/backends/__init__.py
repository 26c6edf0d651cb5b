"""Backends start ranks. Each is one module with `check(recipe, cluster)` (raise UsageError
before anything starts) and `launch(recipe, cluster, run) -> exit code`; the cluster config
names the backend, nothing is auto-detected."""
from __future__ import annotations

import os
import signal
from types import ModuleType
from typing import Any

from launcher.config import ClusterConfig
from launcher.runs import Run


def get(cluster: ClusterConfig) -> ModuleType:
    if cluster.backend == "slurm":
        from launcher.backends import slurm

        return slurm
    from launcher.backends import local

    return local


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def status(run: Run) -> dict[str, Any]:
    info = run.info()
    if info.get("backend") == "slurm":
        from launcher.backends import slurm

        return slurm.status(run)
    result = run.result()
    pid = info.get("pid")
    if pid and _alive(pid):
        state = "running"
    elif result:
        state = result.get("outcome", "unknown")
    else:
        state = "failed" if info.get("launches") else "unknown"
    return {"run": run.name, "state": state, "backend": "local", "dir": str(run.dir), **_summary(result)}


def cancel(run: Run) -> str:
    info = run.info()
    if info.get("backend") == "slurm":
        from launcher.backends import slurm

        return slurm.cancel(run)
    pid = info.get("launcher_pid") or info.get("pid")
    if not pid or not _alive(pid):
        return f"run {run.name} is not running"
    os.kill(pid, signal.SIGTERM)  # the ranks save a checkpoint, then exit
    return f"sent SIGTERM to run {run.name} (pid {pid}); it saves a checkpoint and stops"


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k in ("step", "epoch", "val/acc", "val/loss", "signal")}
