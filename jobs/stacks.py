"""STAND-IN for wt-stacks' `jobs.stacks` (issue 24 point 3): only `dump`, with the agreed signature, so the
watchdog can dump every rank's stack before it ends a hung attempt. The real module (faulthandler fallback,
`install`) replaces this one at merge."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def _py_spy() -> str | None:
    """py-spy on PATH, or beside this interpreter (a virtual environment's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def dump(pids: dict[int, int], dest: Path, timeout_s: float = 20.0) -> dict[int, str]:
    """rank -> its Python stack (py-spy dump), also written to dest/rank{N}.txt; never hangs or raises."""
    tool, out = _py_spy(), {}
    for rank, pid in sorted(pids.items()):
        out[rank] = _one(tool, pid, timeout_s)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f"rank{rank}.txt").write_text(out[rank])
        except OSError:
            pass
    return out


def _one(tool: str | None, pid: int, timeout_s: float) -> str:
    if tool is None:
        return f"pid {pid}: no stack dumper available (install py-spy)\n"
    try:
        done = subprocess.run([tool, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as err:
        return f"pid {pid}: py-spy failed: {err}\n"
    return done.stdout or f"pid {pid}: py-spy said: {done.stderr.strip()}\n"
