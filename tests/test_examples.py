"""The example user project (examples/project), used as a person would: copied out of the repository
and run from the copy, with only the launcher itself on the import path (as an installed launcher is).

Its three ways of running user code each run here: the recipe that names the project's package by
import path (`launcher launch sines`), a plain torchrun script (`launcher run train_ddp.py`), and a
script that survives a stop with the runtime API (`launcher run train_resumable.py`, cancelled and
run again, ends with the weights of a run that was never stopped)."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, Background, read_result, user_cli, user_env, wait_until

EXAMPLE = REPO / "examples" / "project"
# what an example file may import from the launcher: only the public runtime API, and only where it is the point
LAUNCHER_PACKAGES = {"launcher", "jobs"}
ALLOWED = {"train_resumable.py": {"jobs.runtime"}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the example project, outside the repository."""
    copy = tmp_path / "project"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return copy


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_example_uses_no_launcher_internals() -> None:
    """A person copies the project: it may use the runtime API (where that is the point), nothing else."""
    files = sorted(EXAMPLE.rglob("*.py"))
    assert {p.name for p in files} >= {"train_ddp.py", "train_resumable.py", "model.py", "data.py", "metrics.py"}
    for path in files:
        ours = {name for name in _imports(path) if name.split(".")[0] in LAUNCHER_PACKAGES}
        allowed = ALLOWED.get(path.name, set())
        assert ours <= allowed, f"{path.relative_to(REPO)} imports {sorted(ours - allowed)} from the launcher"
    assert "jobs.runtime" in _imports(EXAMPLE / "train_resumable.py")


def test_the_recipe_is_found_in_the_project_directory(project: Path) -> None:
    shown = user_cli(project, "show", "sines")  # ./recipes/sines.yaml, by name
    assert shown.returncode == 0, shown.stderr
    assert "target: sinenet.model:mlp" in shown.stdout and "best_metric: val/mae" in shown.stdout, shown.stdout
    assert "world size 2" in shown.stdout, shown.stdout


# ----------------------------------------------------------------------------- on 2 ranks
@pytest.mark.slow
def test_recipe_with_import_paths_trains_and_reports_val_mae(project: Path) -> None:
    typo = user_cli(project, "launch", "sines", "metrics.mae=sinenet.metrics:mea", "--run-name", "typo")
    assert typo.returncode == 2 and "module sinenet.metrics has no attribute 'mea'" in typo.stderr, typo.stderr
    assert not (project / "runs").exists()  # the project's package is imported before anything is written
    proc = user_cli(project, "launch", "sines", "trainer.max_steps=20", "trainer.eval_every=10",
                    "checkpoint.every_steps=10", "--run-name", "sines")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed at step 20: val/loss=" in proc.stdout and "val/mae=" in proc.stdout, proc.stdout
    run = project / "runs" / "sines"  # ./runs of the project's directory
    result = read_result(run)
    assert result["outcome"] == "completed" and result["step"] == 20 and "val/acc" not in result, result
    maes = [r["val/mae"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/mae" in r]
    assert len(maes) == 2 and maes[1] < maes[0], maes  # it learned
    assert json.loads((run / "run.json").read_text())["code_dir"] == str(project)
    assert "rank 1 of 2" in (run / "logs" / "rank1.log").read_text()


@pytest.mark.slow
def test_plain_ddp_script_runs_on_both_ranks(project: Path) -> None:
    proc = user_cli(project, "run", "train_ddp.py", "--procs-per-node", "2", "--run-name", "ddp", "--", "--steps", "6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[rank1] rank 1 done: 6 steps" in proc.stdout, proc.stdout  # the console shows every rank, prefixed
    logs = project / "runs" / "ddp" / "logs"
    for rank in (0, 1):
        log = (logs / f"rank{rank}.log").read_text()
        assert f"rank {rank} of 2 on cpu" in log and f"rank {rank} done: 6 steps, 192 samples" in log, log
    assert "val/mae" in (logs / "rank0.log").read_text() and "val/mae" not in (logs / "rank1.log").read_text()
    assert read_result(project / "runs" / "ddp")["outcome"] == "completed"


def _resumable(name: str, *script_args: str) -> list[str]:
    return ["run", "train_resumable.py", "--procs-per-node", "2", "--run-name", name, "--", "--steps", "150",
            *script_args]


def _checkpoint(run: Path, step: int) -> dict:
    import torch

    folder = run / "checkpoints" / f"step-{step:09d}"
    assert (folder / "manifest.json").exists(), f"{folder} was not committed"
    return {part: torch.load(folder / f"{part}.pt", map_location="cpu", weights_only=True) for part in ("model", "optim")}


def _equal(a: object, b: object) -> bool:
    """Nested state dicts hold the same tensors bit for bit."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.equal(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


@pytest.mark.slow
def test_runtime_api_script_cancelled_and_run_again_ends_bit_equal(project: Path) -> None:
    slow = "--step-sleep", "0.05"  # time to cancel it mid-run; the data and the math stay the same
    cut = subprocess.Popen([sys.executable, "-m", "launcher", *_resumable("cut", *slow)], cwd=project, env=user_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = project / "runs" / "cut" / "logs" / "rank0.log"

    def reached_step_10() -> bool:
        if cut.poll() is not None:
            raise AssertionError(f"run cut ended before it was cancelled:\n{cut.communicate()[0]}")
        return log.exists() and "step 10 loss" in log.read_text()

    wait_until(reached_step_10, "run cut to reach step 10", timeout=120, poll=0.05)
    cancel = user_cli(project, "cancel", "cut")
    assert cancel.returncode == 0 and "sent SIGTERM" in cancel.stdout, cancel.stdout + cancel.stderr
    assert "(runtime API) saves a checkpoint" in cancel.stdout, cancel.stdout  # run.json: it imported jobs.runtime
    out = cut.communicate(timeout=120)[0]
    assert cut.returncode != 0 and "the script was cancelled (SIGTERM)" in out, out
    stopped_at = int(log.read_text().split("stopping at step ")[1].split()[0])
    assert 10 <= stopped_at < 150

    # the run never stopped: it trains while the continued run cut sleeps between its steps
    straight = Background(*_resumable("straight"), runs_dir=project / "runs", env=user_env(), cwd=project)
    again = user_cli(project, *_resumable("cut", *slow))  # the same command continues the run
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed at step {stopped_at}" in log.read_text()
    straight.finish()
    a, b = _checkpoint(project / "runs" / "straight", 150), _checkpoint(project / "runs" / "cut", 150)
    assert _equal(a, b)
