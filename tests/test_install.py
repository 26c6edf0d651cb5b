"""Tier 2: the launcher installed as a wheel into a fresh virtual environment and used from a project
directory that is not the repository: built-in recipes and cluster configs travel with the wheel, the
project's ./recipes come first, runs go to the project's ./runs; `launcher run` runs the project's own
scripts, and the runtime API (`from jobs import runtime`) is importable inside their ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, trains two steps

SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "artifacts", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", "wandb", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launcher's wheel, built from a copy of the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source, wheels = root / "source", root / "wheels"
    shutil.copytree(REPO, source, ignore=SKIP)  # builds leave build/ behind: not in the checkout
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(source)], cwd=root)
    return next(wheels.glob("torchferry-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the launcher's wheel installed; its dependencies (torch, ...) are the test
    environment's, reached through a .pth file, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("install")
    env = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=root)
    python = env / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    Path(purelib.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
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
    where = _run([str(venv / "bin" / "python"), "-c", "import launcher, jobs.schema; print(launcher.__file__); "
                  "print(jobs.schema.RECIPES_DIR)"], cwd=project).split()
    assert where[0].startswith(str(venv)) and where[1] == str(venv / "share" / "launcher" / "recipes"), where
    assert "name: vgg_pretrain" in _run([launcher, "show", "vgg_pretrain", "--cluster", "local_slurm"], cwd=project)
    _run([launcher, "launch", "tiny"], cwd=project)
    results = list((project / "runs").glob("tiny-*/result.json"))
    assert len(results) == 1 and '"outcome": "completed"' in results[0].read_text()
    assert not list((REPO / "runs").glob("tiny-*"))  # the project's runs stay in the project


def test_wheel_installs_only_its_two_planes_next_to_pypi_schema(wheel: Path, venv: Path) -> None:
    """The wheel's top-level names are `launcher` and `jobs` (plus its own metadata): the PyPI package
    `schema`, installed beside it (the dev extras install it), is still the one `import schema` finds, and
    both import in one process."""
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].startswith("torchferry-")} == {"launcher", "jobs"}
    said = _run([str(venv / "bin" / "python"), "-c", "import schema, launcher.cli, jobs.schema, jobs.runtime; "
                 "print(schema.__file__); print(schema.Schema(int).validate(3)); print(jobs.schema.__file__)"],
                cwd=venv).split()
    assert not said[0].startswith(str(venv)) and said[0].endswith("schema/__init__.py"), said  # PyPI's
    assert said[1] == "3" and said[2].startswith(str(venv)), said
    assert "usage: launcher" in _run([str(venv / "bin" / "launcher"), "--help"], cwd=venv)


def test_wheel_holds_every_module(wheel: Path) -> None:
    """Every module of the two planes (jobs.schema, jobs.script and jobs.runtime, which ranks of `launcher run` import,
    launcher.scripts, every subpackage) is in the wheel: packages.find includes them by name."""
    files = [p for plane in ("launcher", "jobs") for p in (REPO / plane).rglob("*.py")]
    modules = {str(p.relative_to(REPO)) for p in files if "__pycache__" not in p.parts}
    assert {"jobs/script.py", "jobs/runtime.py", "launcher/scripts.py"} <= modules
    assert modules <= set(zipfile.ZipFile(wheel).namelist())


PLAIN = """\
import os, sys
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} args {sys.argv[1:]!r}", flush=True)
"""

USES_RUNTIME = """\
import torch
from jobs import runtime

ckpt = runtime.checkpointer()
found = ckpt.load_latest(map_location="cpu")
step, state = found if found is not None else (0, {"w": torch.zeros(2)})
w = state["w"] + 1
ckpt.save(step + 1, {"w": w})
ckpt.close()
print(f"runtime={runtime.__file__} run_id={runtime.run_id()} resumed_from={step} w={w.tolist()}", flush=True)
"""


def test_installed_wheel_runs_scripts(venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "plain.py").write_text(PLAIN)
    (project / "resumable.py").write_text(USES_RUNTIME)
    launcher = str(venv / "bin" / "launcher")
    args = ["--lr", "0.1 x", "é"]
    _run([launcher, "run", "plain.py", "--procs-per-node", "2", "--run-name", "plain", "--", *args], cwd=project)
    logs = project / "runs" / "plain" / "logs"
    for rank in (0, 1):
        assert f"rank {rank} of 2 args {args!r}" in (logs / f"rank{rank}.log").read_text()
    said = [_run([launcher, "run", "resumable.py", "--run-name", "rt"], cwd=project) for _ in range(2)]
    run_id = json.loads((project / "runs" / "rt" / "run.json").read_text())["run_id"]
    runtime = venv / "lib"  # the runtime API the ranks imported is the installed one
    assert f"run_id={run_id} resumed_from=0 w=[1.0, 1.0]" in said[0] and f"runtime={runtime}" in said[0], said[0]
    assert f"run_id={run_id} resumed_from=1 w=[2.0, 2.0]" in said[1], said[1]
