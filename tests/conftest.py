"""Shared fixtures. Multi-rank tests run real processes (torchrun, gloo on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def run_cli(*args: str, runs_dir: Path | None = None, timeout: float = 600, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """The real `launcher` CLI in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "launcher", *args]
    if runs_dir is not None:
        cmd += ["--runs-dir", str(runs_dir)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def slurm() -> None:
    """The real single-node Slurm of scripts/slurm_local.sh; skipped only where it cannot be installed."""
    from slurm_cluster import ensure_slurm, slurm_available

    ok, why = slurm_available()
    if not ok:
        pytest.skip(f"local Slurm cannot run here: {why}")
    ensure_slurm()
