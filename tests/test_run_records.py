"""Tier 1: what the launcher reads from a run directory. A checkpoint counts once it is committed (its
manifest.json written last, jobs.checkpoint's protocol), never because a `step-*` folder exists: a save
killed part-way leaves one behind."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_cli
from jobs.checkpoint import Checkpointer, step_dir_name
from jobs.schema.run_dir import Run, RunResult
from launcher.runs import prepare_run
from jobs.schema import CheckpointConfig, StorageConfig, load_cluster, load_recipe
from jobs.schema.errors import UsageError


def _launch(root: Path, resume: str) -> Run:
    return prepare_run(load_recipe("digits"), load_cluster("local"), "r", root, resume)


def test_resume_never_refuses_a_run_with_a_committed_checkpoint(tmp_path: Path) -> None:
    run = _launch(tmp_path, "auto")
    ckpt = Checkpointer(CheckpointConfig(), run.dir / "checkpoints", None, StorageConfig())
    ckpt.save(4, {"model": {"w": torch.ones(2)}}, {})
    assert ckpt.flush(30)
    ckpt.close()
    with pytest.raises(UsageError, match="run 'r' already has checkpoints in .*pass --resume auto to continue it"):
        _launch(tmp_path, "never")


def test_resume_never_ignores_a_save_that_never_committed(tmp_path: Path) -> None:
    run = _launch(tmp_path, "auto")
    partial = run.dir / "checkpoints" / step_dir_name(4)
    partial.mkdir(parents=True)
    (partial / "model.pt").write_bytes(b"the first bytes of a save killed before its manifest.json")
    assert _launch(tmp_path, "never").dir == run.dir  # nothing to resume, so nothing to refuse: a fresh start


def test_resume_never_refuses_a_script_run_with_its_own_checkpoints(tmp_path: Path) -> None:
    run = _launch(tmp_path, "auto")
    (run.dir / "script_checkpoints").mkdir()
    assert _launch(tmp_path, "never").dir == run.dir  # an empty folder is nothing to continue
    (run.dir / "script_checkpoints" / "out").mkdir()
    (run.dir / "script_checkpoints" / "out" / "ckpt.pt").write_bytes(b"a script's own save")
    with pytest.raises(UsageError, match="already has checkpoints in .*script_checkpoints; pass --resume auto"):
        _launch(tmp_path, "never")


def test_status_shows_every_metric_the_recipe_measures(tmp_path: Path) -> None:
    """A regression recipe's val/mae is shown like the built-in val/acc (result.json keeps metrics flat)."""
    run = _launch(tmp_path, "auto")
    run.write_result(RunResult(outcome="completed", step=9, epoch=1, metrics={"val/loss": 0.5, "val/mae": 0.25}))
    proc = run_cli("status", "r", runs_dir=tmp_path)
    assert proc.returncode == 0 and "val/mae: 0.25" in proc.stdout and "step: 9" in proc.stdout, proc.stdout
