"""Faults in the checkpoint path: a disk that refuses writes (a real kernel error: RLIMIT_FSIZE
makes writes past the limit fail with EFBIG, as a full disk fails them with ENOSPC), a remote
folder that belongs to another run, and a remote checkpoint corrupted after its upload."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import REPO, read_result
from jobs.checkpoint import MANIFEST, Checkpointer, ForeignRunFolder, step_dir_name
from jobs.storage import OWNER_FILE
from jobs.schema import CheckpointConfig, StorageConfig

LIMIT = 100_000  # bytes a file may grow to while the disk "is full"
SMALL = {"model": {"w": torch.ones(100)}, "trainer": {"step": 0}}
LARGE = {"model": {"w": torch.ones(LIMIT)}, "trainer": {"step": 0}}  # 400 kB: past the limit


def make_cfg(**overrides: Any) -> CheckpointConfig:
    return CheckpointConfig(**{"upload_retries": 1, "flush_timeout_s": 30.0, **overrides})


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail with EFBIG in this process (SIGXFSZ ignored, so it is not killed)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a disk that refuses writes
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_write_costs_the_save_not_the_run(tmp_path: Path, async_save: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jobs.checkpoint")
    ckpt = Checkpointer(make_cfg(async_save=async_save), tmp_path, None, StorageConfig())
    ckpt.save(1, SMALL, {})
    assert ckpt.flush(10)
    with file_size_limit(LIMIT):
        ckpt.save(2, LARGE, {})  # sync: must not raise into the training loop
        assert ckpt.flush(10)  # step 1 is committed: the run has a checkpoint to resume from
    assert not (tmp_path / step_dir_name(2)).exists(), "the partial folder must be removed"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(tmp_path / step_dir_name(2)) in e and "File too large" in e for e in errors), errors

    ckpt.save(3, SMALL, {})  # async: the failure must not surface at the next save either
    assert ckpt.flush(10)
    ckpt.close()
    assert ckpt.latest() == str(tmp_path / step_dir_name(3))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(1), step_dir_name(3)]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_flush_reports_nothing_committed_when_every_save_failed(tmp_path: Path, async_save: bool) -> None:
    ckpt = Checkpointer(make_cfg(async_save=async_save), tmp_path, None, StorageConfig())
    with file_size_limit(LIMIT):
        ckpt.save(1, LARGE, {})
        ckpt.save(2, LARGE, {})
        assert not ckpt.flush(10)
    ckpt.close()
    assert not list(tmp_path.glob("step-*")) and ckpt.latest() is None


def _launch_limited(runs_dir: Path, name: str, overrides: list[str], limit: int) -> subprocess.CompletedProcess:
    """The real CLI with every process under it limited to files of `limit` bytes."""
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes fail, nothing is killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, "-m", "launcher", "launch", "digits", *overrides, "--run-name", name,
           "--runs-dir", str(runs_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_files)


@pytest.mark.slow  # training runs through the real CLI
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_run_whose_saves_all_fail_completes_and_says_so(runs_dir: Path, async_save: bool) -> None:
    """AdamW's optimizer.pt (~310 kB) is past the limit, the model (~160 kB) and logs are not."""
    overrides = ["trainer.max_steps=6", "checkpoint.every_steps=2", "optim.name=adamw", "logging.progress_bar=false",
                 f"checkpoint.async_save={str(async_save).lower()}"]
    proc = _launch_limited(runs_dir, "full", overrides, limit=230_000)
    run = runs_dir / "full"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = read_result(run)
    assert result["outcome"] == "completed" and result["step"] == 6
    assert result["checkpoints_committed"] is False
    assert not list((run / "checkpoints").glob("step-*")), "no partial step folder may stay"
    log = (run / "logs" / "rank0.log").read_text()
    for step in (2, 4, 6):
        assert f"checkpoint step {step} NOT saved: writing {run / 'checkpoints' / step_dir_name(step)}" in log
    assert "File too large" in log and "ERROR" in proc.stdout  # loud on the console too


# ----------------------------------------------------------------------------- a folder of another run
def _first_run(tmp_path: Path, remote: str) -> None:
    first = Checkpointer(make_cfg(async_save=False, keep_last=1), tmp_path / "a", remote, StorageConfig(),
                         run_id="run-a")
    for step in (1, 2):
        first.save(step, SMALL, {})
    assert first.flush(10)
    first.close()


def test_another_runs_remote_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    remote_dir = tmp_path / "remote" / "shared"
    remote = f"file://{remote_dir}"
    _first_run(tmp_path, remote)
    assert json.loads((remote_dir / OWNER_FILE).read_text())["run_id"] == "run-a"
    assert json.loads((remote_dir / step_dir_name(2) / MANIFEST).read_text())["run_id"] == "run-a"
    before = tree(remote_dir)

    with pytest.raises(ForeignRunFolder) as refused:
        Checkpointer(make_cfg(async_save=False, keep_last=1), tmp_path / "b", remote, StorageConfig(), run_id="run-b")
    message = str(refused.value)
    assert "run-a" in message and "run-b" in message and str(remote_dir) in message
    assert "--run-id run-a" in message and "--run-name" in message
    reader = Checkpointer(make_cfg(), tmp_path / "b", remote, StorageConfig(), is_writer=False, run_id="run-b")
    with pytest.raises(ForeignRunFolder):
        reader.latest()  # another run's checkpoints are never resumed from

    (remote_dir / OWNER_FILE).unlink()  # a folder without a record: its manifests name the owner
    with pytest.raises(ForeignRunFolder, match="run-a"):
        Checkpointer(make_cfg(async_save=False), tmp_path / "b", remote, StorageConfig(), run_id="run-b")
    assert tree(remote_dir) == {k: v for k, v in before.items() if k != OWNER_FILE}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_folder_claimed_meanwhile_is_neither_written_nor_pruned(tmp_path: Path, async_save: bool) -> None:
    """Two runs that started at once both found the folder free: the one that lost stops there."""
    remote_dir = tmp_path / "remote"
    ckpt = Checkpointer(make_cfg(async_save=async_save, keep_last=1), tmp_path / "local", f"file://{remote_dir}",
                        StorageConfig(), run_id="run-b")
    (remote_dir / OWNER_FILE).write_text(json.dumps({"run_id": "run-a"}))
    (remote_dir / step_dir_name(1)).mkdir()  # run a's, for retention to (not) delete
    (remote_dir / step_dir_name(1) / "model.pt").write_bytes(b"run a")
    before = tree(remote_dir)
    with pytest.raises(ForeignRunFolder, match="run-a"):
        ckpt.save(2, SMALL, {})
        ckpt.flush(10)
    ckpt.close()
    assert tree(remote_dir) == before


# ----------------------------------------------------------------------------- a corrupt remote checkpoint
def test_a_corrupt_remote_checkpoint_is_skipped_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    remote_dir = tmp_path / "remote"
    state = {"model": {"w": torch.arange(1000.0)}, "trainer": {"step": 2}}
    first = Checkpointer(make_cfg(async_save=False), tmp_path / "a", f"file://{remote_dir}", StorageConfig(),
                         run_id="r")
    first.save(1, SMALL, {})
    first.save(2, state, {})
    first.close()
    model = remote_dir / step_dir_name(2) / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    model.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="jobs.checkpoint")
    fresh = Checkpointer(make_cfg(async_save=False), tmp_path / "b", f"file://{remote_dir}", StorageConfig(),
                         run_id="r")  # a new machine: no local copies
    loaded = fresh.load_latest()
    assert loaded is not None and loaded[0] == f"file://{remote_dir}/{step_dir_name(1)}"
    assert torch.equal(loaded[1]["model"]["w"], SMALL["model"]["w"])
    assert any(f"skipping checkpoint file://{remote_dir}/{step_dir_name(2)}" in r.getMessage() for r in caplog.records)

    fresh.save(2, state, {})  # the resumed run saves step 2 again, byte for byte: the upload must replace it
    assert fresh.flush(10)
    fresh.close()
    assert torch.equal(fresh.load(f"file://{remote_dir}/{step_dir_name(2)}")["model"]["w"], state["model"]["w"])
