"""Tier 2: the launcher installed as a wheel into a fresh virtual environment and used from a project
directory that is not the repository: built-in recipes and cluster configs travel with the wheel, the
project's ./recipes come first, runs go to the project's ./runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, trains two steps

SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "artifacts", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", "wandb", "bench")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the launcher's wheel installed; its dependencies (torch, ...) are the test
    environment's, reached through a .pth file, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("install")
    source, wheels, env = root / "source", root / "wheels", root / "venv"
    shutil.copytree(REPO, source, ignore=SKIP)  # builds leave build/ behind: not in the checkout
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(source)], cwd=root)
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=root)
    python = env / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    Path(purelib.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("launcher-*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=root)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_installed_wheel_runs_from_a_project_directory(venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    digits = yaml.safe_load((REPO / "recipes" / "digits.yaml").read_text())
    digits["trainer"] = {**digits["trainer"], "max_steps": 2, "epochs": None}
    digits["parallel"] = {**digits["parallel"], "procs_per_node": 1}
    (project / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(digits))
    launcher = str(venv / "bin" / "launcher")
    where = _run([str(venv / "bin" / "python"), "-c", "import launcher, schema; print(launcher.__file__); "
                  "print(schema.RECIPES_DIR)"], cwd=project).split()
    assert where[0].startswith(str(venv)) and where[1] == str(venv / "share" / "launcher" / "recipes"), where
    assert "name: vgg_pretrain" in _run([launcher, "show", "vgg_pretrain", "--cluster", "local_slurm"], cwd=project)
    _run([launcher, "launch", "tiny"], cwd=project)
    results = list((project / "runs").glob("tiny-*/result.json"))
    assert len(results) == 1 and '"outcome": "completed"' in results[0].read_text()
    assert not list((REPO / "runs").glob("tiny-*"))  # the project's runs stay in the project
