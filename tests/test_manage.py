"""Tier 2: status, logs and cancel for local runs (the Slurm ones are in test_slurm.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_result, run_cli
from jobs.models import build_model
from jobs.schema import load_recipe

pytestmark = pytest.mark.slow  # training runs through the real CLI


def test_local_status_logs_cancel(runs_dir: Path) -> None:
    cmd = [sys.executable, "-m", "launcher", "launch", "vgg_pretrain", "trainer.epochs=50", "logging.log_every=1",
           "--run-name", "live", "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = runs_dir / "live" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)

    status = run_cli("status", "live", runs_dir=runs_dir, check=True).stdout
    assert "state: running" in status and "backend: local" in status
    logs = run_cli("logs", "live", "--rank", "1", runs_dir=runs_dir, check=True).stdout
    assert "rank 1 of 2" in logs
    assert run_cli("logs", "live", "--rank", "7", runs_dir=runs_dir).returncode == 2

    follow = subprocess.Popen([sys.executable, "-m", "launcher", "logs", "live", "--follow", "--runs-dir",
                               str(runs_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert follow.poll() is None  # still following while the run is alive

    out = run_cli("cancel", "live", runs_dir=runs_dir, check=True).stdout
    assert "saves a checkpoint and stops" in out
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "the same command resumes it" in output
    result = read_result(runs_dir / "live")
    followed = follow.communicate(timeout=30)[0]  # --follow ends by itself once the run has stopped
    assert "rank 0 of 2" in followed and f"preempted at step {result['step']}" in followed
    assert result["outcome"] == "cancelled" and result["checkpoints_committed"]  # stopped by `launcher cancel`
    assert (runs_dir / "live" / "checkpoints" / f"step-{result['step']:09d}" / "manifest.json").exists()
    status = run_cli("status", "live", runs_dir=runs_dir, check=True).stdout
    assert "state: cancelled" in status and f"step: {result['step']}" in status
    assert run_cli("status", "nosuchrun", runs_dir=runs_dir).returncode == 2

    # export takes the newest committed checkpoint: a plain state dict that loads into the bare model
    exported = runs_dir / "weights.pt"
    out = run_cli("export", "live", "--to", str(exported), runs_dir=runs_dir, check=True).stdout
    assert f"step-{result['step']:09d}" in out
    weights = torch.load(exported, weights_only=True)
    model = build_model(load_recipe("vgg_pretrain").model)
    model.load_state_dict(weights)
    saved = torch.load(runs_dir / "live" / "checkpoints" / f"step-{result['step']:09d}" / "model.pt",
                       weights_only=True)
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_relaunch_of_a_running_run_is_refused(runs_dir: Path) -> None:
    """A second `launch` of a live local run names its pid and changes nothing; once the run has
    stopped, run.json no longer holds a pid that another process could reuse."""
    cmd = [sys.executable, "-m", "launcher", "launch", "digits", "trainer.epochs=1000", "--run-name", "busy",
           "--runs-dir", str(runs_dir)]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    run_dir = runs_dir / "busy"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists():  # the ranks train: run.json holds the pids by now
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.1)
    pid = json.loads((run_dir / "run.json").read_text())["pid"]
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix in (".json", ".yaml")}
    try:
        again = run_cli("launch", "digits", "trainer.max_steps=3", "--run-name", "busy", runs_dir=runs_dir,
                        timeout=60)
        assert again.returncode == 2, again.stdout + again.stderr
        assert again.stderr.startswith(f"error: run busy is already running (pid {pid}, "), again.stderr
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name in files} == files
    finally:
        cancel = run_cli("cancel", "busy", runs_dir=runs_dir)
        if "saves a checkpoint and stops" not in cancel.stdout:
            first.terminate()  # the launcher forwards it to the ranks
        first.communicate(timeout=120)
    assert cancel.returncode == 0 and "saves a checkpoint and stops" in cancel.stdout, cancel
    info = json.loads((run_dir / "run.json").read_text())
    assert info["state"] == "preempted" and not {"pid", "launcher_pid"} & info.keys()
    assert run_cli("cancel", "busy", runs_dir=runs_dir, check=True).stdout.strip() == "run busy is not running"
