"""Helpers to bring up the local single-node Slurm cluster for integration tests.

Standard library only (no pytest import), so it can be used from any test
module or from the command line::

    python tests/slurm_cluster.py        # start Slurm (installing it if needed)

The actual work is done by ``scripts/slurm_local.sh``; see that script for the
cluster layout (partition ``debug``, one node advertising 8 CPUs, accounting
through slurmdbd so ``sacct`` works).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "slurm_local.sh"

# Installing the packages from scratch takes ~10-15 s; starting ~1-2 s.
START_TIMEOUT_S = 600


def slurm_available() -> tuple[bool, str]:
    """Whether ``scripts/slurm_local.sh start`` can be expected to work here.

    True if the script exists, bash is present, we are root, and Slurm is
    either already installed (``sinfo`` on PATH) or installable (``apt-get``).
    Otherwise False with a human-readable reason (suitable for a skip message).
    """
    if not SCRIPT.is_file():
        return False, f"{SCRIPT} not found"
    if shutil.which("bash") is None:
        return False, "bash not found"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "not running as root (slurm_local.sh needs root)"
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        return False, "neither sinfo nor apt-get found (cannot install Slurm)"
    return True, ""


def ensure_slurm() -> None:
    """Start (installing if needed) the local Slurm cluster; idempotent.

    Raises RuntimeError carrying the script's output if it fails.
    """
    ok, reason = slurm_available()
    if not ok:
        raise RuntimeError(f"local Slurm not available: {reason}")
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise RuntimeError(
            f"scripts/slurm_local.sh start timed out after {START_TIMEOUT_S}s:\n{out}"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/slurm_local.sh start failed (rc={proc.returncode}):\n{proc.stdout}"
        )


if __name__ == "__main__":
    ok, why = slurm_available()
    if not ok:
        print(f"slurm not available: {why}", file=sys.stderr)
        sys.exit(1)
    ensure_slurm()
    print("slurm is up")
