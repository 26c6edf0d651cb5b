"""Tier 1: a user's project directory. Recipes and cluster configs are found in its ./recipes and
./cluster_configs first (a project can add its own and shadow built-in ones), then the built-in ones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def _launcher(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the launcher, as if installed; cwd is the user's project
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _project(tmp_path: Path) -> Path:
    (tmp_path / "recipes" / "mine").mkdir(parents=True)
    (tmp_path / "cluster_configs").mkdir()
    digits = yaml.safe_load((REPO / "recipes" / "digits.yaml").read_text())
    (tmp_path / "recipes" / "mine" / "tiny.yaml").write_text(yaml.safe_dump({**digits, "trainer": {
        **digits["trainer"], "max_steps": 7}}))
    (tmp_path / "recipes" / "digits.yaml").write_text(yaml.safe_dump({**digits, "trainer": {
        **digits["trainer"], "max_steps": 11}}))
    (tmp_path / "cluster_configs" / "local.yaml").write_text(yaml.safe_dump({"backend": "local",
                                                                            "runs_dir": "my-runs"}))
    return tmp_path


def test_project_recipes_come_first_then_the_built_in_ones(tmp_path: Path) -> None:
    project = _project(tmp_path)
    shown = _launcher(project, "show", "tiny")
    assert shown.returncode == 0, shown.stderr
    assert "max_steps: 7" in shown.stdout and "name: tiny" in shown.stdout
    shadowed = _launcher(project, "show", "digits")  # the project's digits.yaml, not the built-in one
    assert shadowed.returncode == 0 and "max_steps: 11" in shadowed.stdout, shadowed.stderr
    built_in = _launcher(project, "show", "vgg_pretrain")  # not in the project: the built-in one
    assert built_in.returncode == 0 and "name: vgg_pretrain" in built_in.stdout, built_in.stderr
    in_repo = _launcher(REPO, "show", "digits")
    assert "max_steps: 11" not in in_repo.stdout


def test_project_cluster_configs_come_first(tmp_path: Path) -> None:
    project = _project(tmp_path)
    shown = _launcher(project, "show", "tiny", "--cluster", "local")
    assert shown.returncode == 0 and "runs_dir: my-runs" in shown.stdout, shown.stderr
    slurm = _launcher(project, "show", "tiny", "--cluster", "local_slurm")
    assert slurm.returncode == 0 and "backend: slurm" in slurm.stdout, slurm.stderr


def test_an_unknown_name_lists_both_places(tmp_path: Path) -> None:
    project = _project(tmp_path)
    proc = _launcher(project, "show", "tinyy")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert f"{project / 'recipes'}, {REPO / 'recipes'}: unknown recipe 'tinyy'" in first, proc.stderr
    assert "did you mean 'tiny'?" in proc.stderr and "vgg_pretrain" in proc.stderr
