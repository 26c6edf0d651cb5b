"""Tier 2: whole runs checkpointing to a real S3 endpoint (moto's server on loopback, s3fs)."""
from __future__ import annotations

import json
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

from conftest import REPO, read_result, run_cli
from s3_server import TEST_CREDENTIALS, S3Server, s3_cluster
from test_resume import BASE as RESUME_BASE, CASES

pytestmark = pytest.mark.slow  # training runs against a moto S3 server on loopback

DIGITS = ["trainer.max_steps=6", "checkpoint.every_steps=2", "checkpoint.uri=s3://ckpts/runs",
          "logging.progress_bar=false"]
BASE = [*RESUME_BASE, "checkpoint.uri=s3://ckpts/runs"]  # test_resume's runs, checkpointing to S3
STRAIGHT = [*RESUME_BASE, *CASES["2ranks-sigterm"][0]]  # the same run never stopped, kept on this machine


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[S3Server, Path]]:
    yield from s3_cluster(tmp_path, "ckpts")


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


def _s3(server: S3Server) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", endpoint_url=server.endpoint, key="testing", secret="testing",
                             skip_instance_cache=True)


def _remote_files(server: S3Server, run: str) -> dict[str, bytes]:
    fs = _s3(server)
    return {path: fs.cat_file(path) for path in fs.find(f"ckpts/runs/{run}")}


def _remote_steps(server: S3Server, run: str) -> list[str]:
    fs = _s3(server)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"ckpts/runs/{run}") if fs.exists(p + "/manifest.json"))


def test_resume_from_s3_on_a_fresh_machine(s3: tuple[S3Server, Path], runs_dir: Path, uninterrupted) -> None:
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

    a, b = torch.load(runs_dir / "cut" / "model.pt", weights_only=True), uninterrupted(STRAIGHT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recorded = (runs_dir / "cut" / "run.json").read_text().replace(str(REPO), "")  # the checkout's path may say it
    assert "testing" not in recorded  # no credentials in run files (moto's key and secret are "testing")


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


def test_two_runs_never_share_a_remote_folder(s3: tuple[S3Server, Path], tmp_path: Path) -> None:
    """The same run name under two runs directories and one checkpoint.uri: the second launch is
    refused before anything is written; `--run-id` continues the first run from the store."""
    server, cluster = s3
    first, second = tmp_path / "runs-a", tmp_path / "runs-b"
    _cli("launch", "digits", *DIGITS, "--cluster", str(cluster), "--run-name", "shared", runs_dir=first)
    first_id = json.loads((first / "shared" / "run.json").read_text())["run_id"]
    before = _remote_files(server, "shared")
    assert "ckpts/runs/shared/step-000000006/manifest.json" in before

    refused = _cli("launch", "digits", *DIGITS, "--cluster", str(cluster), "--run-name", "shared", runs_dir=second,
                   check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"belongs to run id {first_id}" in refused.stderr and "s3://ckpts/runs/shared" in refused.stderr
    assert f"--run-id {first_id}" in refused.stderr and "Traceback" not in refused.stderr
    assert not (second / "shared").exists()  # nothing written, nothing started
    assert _remote_files(server, "shared") == before  # the first run's checkpoints are intact

    wrong = _cli("launch", "digits", *DIGITS, "--cluster", str(cluster), "--run-name", "shared", "--run-id", "other1",
                 runs_dir=second, check=False)
    assert wrong.returncode == 2 and "other1" in wrong.stderr and first_id in wrong.stderr
    assert not (second / "shared").exists()

    overrides = [*DIGITS, "trainer.max_steps=8"]
    _cli("launch", "digits", *overrides, "--cluster", str(cluster), "--run-name", "shared", "--run-id", first_id,
         runs_dir=second)
    assert json.loads((second / "shared" / "run.json").read_text())["run_id"] == first_id
    log = (second / "shared" / "logs" / "rank0.log").read_text()
    assert "resumed from s3://ckpts/runs/shared/step-000000006" in log
    assert read_result(second / "shared")["step"] == 8


def test_a_corrupt_remote_checkpoint_is_skipped_on_resume(s3: tuple[S3Server, Path], runs_dir: Path) -> None:
    """The newest checkpoint on the store no longer matches its hashes: the relaunch on a fresh
    machine resumes from the one before it, saying which it skipped."""
    server, cluster = s3
    _cli("launch", "digits", *DIGITS, "--cluster", str(cluster), "--run-name", "bad", runs_dir=runs_dir)
    assert _remote_steps(server, "bad") == ["step-000000004", "step-000000006"]
    fs = _s3(server)
    target = "ckpts/runs/bad/step-000000006/model.pt"
    data = bytearray(fs.cat_file(target))
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    fs.pipe_file(target, bytes(data))
    for child in (runs_dir / "bad" / "checkpoints").iterdir():  # the new machine has no local copies
        subprocess.run(["rm", "-rf", str(child)], check=True)

    _cli("launch", "digits", *DIGITS, "trainer.max_steps=8", "--cluster", str(cluster), "--run-name", "bad",
         runs_dir=runs_dir)
    log = (runs_dir / "bad" / "logs" / "rank0.log").read_text()
    assert "WARNING jobs.checkpoint: skipping checkpoint s3://ckpts/runs/bad/step-000000006" in log
    assert "resumed from s3://ckpts/runs/bad/step-000000004" in log
    assert read_result(runs_dir / "bad")["step"] == 8
