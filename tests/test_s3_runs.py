"""Tier 2: whole runs checkpointing to a real S3 endpoint (moto's server on loopback, s3fs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import fsspec
import pytest
import torch
import yaml

from conftest import REPO, read_result, run_cli
from s3_server import TEST_CREDENTIALS, S3Server, start_s3_server

BASE = ["trainer.epochs=2", "checkpoint.every_steps=4", "checkpoint.uri=s3://ckpts/runs", "logging.log_every=1",
        "logging.progress_bar=false"]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[S3Server, Path]]:
    server = start_s3_server()
    server.create_bucket("ckpts")
    cluster = tmp_path / "s3_local.yaml"
    cluster.write_text(yaml.safe_dump({"backend": "local", "storage": {"endpoint_url": server.endpoint}}))
    try:
        yield server, cluster
    finally:
        server.stop()


def _cli(*args: str, runs_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(*args, runs_dir=runs_dir, env=TEST_CREDENTIALS, check=check)


def _start(runs_dir: Path, name: str, overrides: list[str], cluster: Path, lines: int) -> subprocess.Popen:
    """Launch in the background; return once the run has logged `lines` metric lines."""
    cmd = [sys.executable, "-m", "launcher", "launch", "vgg_pretrain", *overrides, "--cluster", str(cluster),
           "--run-name", name, "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **TEST_CREDENTIALS, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = runs_dir / name / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    return proc


def _remote_steps(server: S3Server, run: str) -> list[str]:
    fs = fsspec.filesystem("s3", endpoint_url=server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"ckpts/runs/{run}") if fs.exists(p + "/manifest.json"))


def test_resume_from_s3_on_a_fresh_machine(s3: tuple[S3Server, Path], runs_dir: Path) -> None:
    """Stopped mid-run, local copies gone (a new VM): the relaunch resumes from S3, bit-exact."""
    server, cluster = s3
    proc = _start(runs_dir, "cut", BASE, cluster, lines=14)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    stopped = read_result(runs_dir / "cut")
    assert stopped["outcome"] == "preempted" and stopped["checkpoints_committed"], out
    assert f"step-{stopped['step']:09d}" in _remote_steps(server, "cut")

    for child in (runs_dir / "cut" / "checkpoints").iterdir():  # the new machine has none of them
        subprocess.run(["rm", "-rf", str(child)], check=True)
    _cli("launch", "vgg_pretrain", *BASE, "--cluster", str(cluster), "--run-name", "cut", runs_dir=runs_dir)
    log = (runs_dir / "cut" / "logs" / "rank0.log").read_text()
    assert f"resumed from s3://ckpts/runs/cut/step-{stopped['step']:09d}" in log

    _cli("launch", "vgg_pretrain", *BASE, "--cluster", str(cluster), "--run-name", "straight", runs_dir=runs_dir)
    a = torch.load(runs_dir / "cut" / "model.pt", weights_only=True)
    b = torch.load(runs_dir / "straight" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "testing" not in (runs_dir / "cut" / "run.json").read_text()  # no credentials in run files


def test_store_outage_does_not_stop_training(s3: tuple[S3Server, Path], runs_dir: Path) -> None:
    """The S3 server goes away mid-run: training finishes on local copies, and the uploads catch up
    on the next launch once the server is back; no half-uploaded checkpoint is ever used."""
    server, cluster = s3
    overrides = BASE + ["checkpoint.flush_timeout_s=3", "checkpoint.upload_retries=2", "trainer.epochs=3"]
    proc = _start(runs_dir, "down", overrides, cluster, lines=6)
    server.stop()
    out = proc.communicate(timeout=300)[0]
    result = read_result(runs_dir / "down")
    assert result["outcome"] == "completed" and result["step"] == 33, out
    assert not result["checkpoints_committed"]  # the last ones are only local so far
    assert (runs_dir / "down" / "checkpoints" / "step-000000033" / "manifest.json").exists()

    server.start()
    server.create_bucket("ckpts")  # moto keeps nothing across a restart: an empty store
    again = _cli("launch", "vgg_pretrain", *overrides, "--cluster", str(cluster), "--run-name", "down",
                 runs_dir=runs_dir)
    assert read_result(runs_dir / "down")["checkpoints_committed"], again.stdout
    assert "step-000000033" in _remote_steps(server, "down")
