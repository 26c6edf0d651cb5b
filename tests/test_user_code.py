"""Users' own model, data, loss and metrics by import path (issue 9, point 1).

A user package is written to a temporary directory outside the repository, which is not on the
launcher's import path: the launch is made from that directory, as a user would (locally and on the
local Slurm), and the package must be found by the launcher's check and on every rank. It trains a
regression (no classes, no accuracy): an MLP on y = W x + noise, a Huber loss and a mean-absolute-error
metric of its own."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from jobs.schema.errors import UsageError
from conftest import Background, final_params, reached_step, read_result, user_cli, user_env, wait_until

USER_PACKAGE = '''\
"""A user's project: nothing here knows the launcher."""
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

NOT_CALLABLE = 3


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


def not_a_model(**kwargs):
    return "a string"


class Slow(Dataset):
    """Sleeps per sample, so that a test can stop a run between steps."""

    def __init__(self, data: Dataset, delay_s: float) -> None:
        self.data, self.delay_s = data, delay_s

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        time.sleep(self.delay_s)
        return self.data[i]


def linear_data(inputs: int, outputs: int, samples: int, noise: float, seed: int, delay_s: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=g)
    y = x @ torch.randn(inputs, outputs, generator=g) + noise * torch.randn(samples, outputs, generator=g)
    n_val = samples // 5
    return Slow(TensorDataset(x[n_val:], y[n_val:]), delay_s), TensorDataset(x[:n_val], y[:n_val])


def huber(outputs: torch.Tensor, targets: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    err = (outputs - targets).abs()
    return torch.where(err < delta, 0.5 * err ** 2, delta * (err - 0.5 * delta)).mean()


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).abs().mean(dim=1)  # one value per sample
'''

RECIPE = {
    "description": "MLP regression on generated data: the user's model, data, loss and metric",
    "model": {"target": "regpkg:mlp", "kwargs": {"inputs": 8, "hidden": 16, "outputs": 2}},
    "data": {"target": "regpkg:linear_data",
             "kwargs": {"inputs": 8, "outputs": 2, "samples": 640, "noise": 0.1, "seed": 3, "delay_s": 0.001}},
    "loss": {"target": "regpkg:huber", "kwargs": {"delta": 0.5}},
    "metrics": {"mae": "regpkg:mae"},
    "optim": {"name": "adamw", "lr": 0.01},
    "schedule": {"name": "constant"},
    "trainer": {"max_steps": 32, "global_batch": 32, "micro_batch": 16, "eval_every": 4, "seed": 0},
    "parallel": {"procs_per_node": 2},
    "checkpoint": {"every_steps": 4, "keep_last": 1, "best_metric": "val/mae", "best_mode": "min"},
    "logging": {"log_every": 1, "progress_bar": False},
}


def _write_project(folder: Path) -> Path:
    (folder / "regpkg").mkdir(parents=True)
    (folder / "regpkg" / "__init__.py").write_text(USER_PACKAGE)
    (folder / "reg.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The user's directory: a package and a recipe, outside the repository."""
    return _write_project(tmp_path / "project")


def _launch(runs: Path, name: str, *overrides: str) -> list[str]:
    return ["launch", "reg.yaml", *overrides, "--run-name", name, "--runs-dir", str(runs)]


# ----------------------------------------------------------------------------- checked before anything starts
BAD_TARGETS = {
    "missing module": ("model.target=nopkg.nets:build", "model.target", "cannot import nopkg.nets"),
    "missing attribute": ("model.target=regpkg:buld", "model.target", "module regpkg has no attribute 'buld'"),
    "not callable": ("data.target=regpkg:NOT_CALLABLE", "data.target",
                     "regpkg.NOT_CALLABLE is not callable (of type int)"),
    "bad metric": ("metrics.mae=regpkg:mea", "metrics.mae", "module regpkg has no attribute 'mea'"),
    "bad loss": ("loss.target=regpkg.huber", "loss.target", "is not an import path"),
    "bad syntax": ("model.target=regpkg:mlp()", "model.target", "is not an import path"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_target_exits_2_before_anything_exists(case: str, project: Path, tmp_path: Path) -> None:
    override, key, found = BAD_TARGETS[case]
    runs = tmp_path / "runs"
    proc = user_cli(project, *_launch(runs, "bad", override))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    value = override.split("=", 1)[1]
    assert first.startswith("error: ") and key in first and repr(value) in first and found in first, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not runs.exists() or not any(runs.iterdir())  # no run directory written


def test_console_script_finds_the_package_in_the_launch_directory(project: Path, tmp_path: Path) -> None:
    """The `launcher` script's own directory is first on its path, not the current one (as with
    `python -m launcher`): the check puts the launch directory there itself."""
    script = Path(sys.executable).parent / "launcher"
    if not script.exists():
        pytest.skip(f"no launcher console script beside {sys.executable} (not pip-installed)")
    proc = subprocess.run([str(script), *_launch(tmp_path / "runs", "x", "metrics.mae=regpkg:mea")],
                          cwd=project, env=user_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "module regpkg has no attribute 'mea'" in proc.stderr, proc.stderr


def test_kwargs_of_any_yaml_type_round_trip_through_show(project: Path) -> None:
    kwargs = {"inputs": 8, "hidden": 16, "outputs": 2, "scale": 0.5, "names": ["a", "b"], "nested": {"on": True},
              "none": None}
    recipe = {**RECIPE, "model": {"target": "regpkg:mlp", "kwargs": kwargs}}
    (project / "kw.yaml").write_text(yaml.safe_dump(recipe))
    proc = user_cli(project, "show", "kw.yaml")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout.split("# cluster")[0])
    assert shown["model"]["kwargs"] == kwargs
    assert shown["metrics"] == {"mae": "regpkg:mae"} and shown["loss"]["target"] == "regpkg:huber"


def test_kwargs_refuse_what_the_ranks_could_not_read_back(project: Path) -> None:
    (project / "date.yaml").write_text((project / "reg.yaml").read_text() + "\n")
    proc = user_cli(project, "show", "date.yaml", "model.kwargs.when=2024-01-01")
    assert proc.returncode == 2 and "model.kwargs.when: date" in proc.stderr, proc.stderr


@pytest.mark.parametrize("made, found", [
    ([1, 2, 3], "returned list, not a (train, validation) pair"),
    ("ab", "returned str, not a (train, validation) pair"),
    (([1], 3), "returned int as the validation data set"),
])
def test_data_factory_must_return_a_pair_of_data_sets(made: object, found: str) -> None:
    from jobs.targets import checked_datasets

    with pytest.raises(UsageError, match=re.escape(f"config.yaml: data.target: 'p:f' \u2014 {found}")):
        checked_datasets("config.yaml", "data.target", "p:f", made)
    assert checked_datasets("config.yaml", "data.target", "p:f", ([1], "ab")) == ([1], "ab")


def test_best_metric_must_be_one_that_evaluation_gives(project: Path) -> None:
    from jobs.schema import ConfigError, load_recipe

    assert load_recipe(str(project / "reg.yaml")).eval_metrics == {"mae": "regpkg:mae"}
    with pytest.raises(ConfigError, match=r"checkpoint.best_metric: 'val/acc' is not evaluated"):
        load_recipe(str(project / "reg.yaml"), ["metrics=null", "checkpoint.best_metric=val/acc"])
    assert load_recipe("digits").eval_metrics == {"acc": "jobs.training.objective:accuracy"}


# ----------------------------------------------------------------------------- on 2 ranks
@pytest.mark.slow
def test_wrong_return_type_fails_the_run_with_one_line_in_the_rank_log(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = user_cli(project, *_launch(runs, "wrong", "model.target=regpkg:not_a_model"))
    assert proc.returncode != 0
    log = (runs / "wrong" / "logs" / "rank0.log").read_text()
    assert "model.target: 'regpkg:not_a_model' \u2014 returned str, not an nn.Module" in log, log
    assert "Traceback" not in log


def _kept_steps(run_dir: Path) -> set[int]:
    steps = (run_dir / "checkpoints").glob("step-*")
    return {int(p.name.split("-")[1]) for p in steps if (p / "manifest.json").exists()}


def _val_mae(run_dir: Path) -> dict[int, float]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val/mae"] for r in map(json.loads, lines) if "val/mae" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Path]]:
    """The uninterrupted local run of the recipe, made once for the tests that compare with it (the
    stopped-and-resumed run, the Slurm run). It starts in the background, from a project directory
    of its own, and is waited for when first needed."""
    folder = _write_project(tmp_path_factory.mktemp("straight") / "project")
    runs = folder.parent / "runs"
    run = Background("launch", "reg.yaml", "--run-name", "straight", runs_dir=runs, env=user_env(), cwd=folder)

    def wait() -> Path:
        run.finish()
        return runs / "straight"
    yield wait
    run.stop()  # a test that failed before waiting leaves it running


@pytest.mark.slow
def test_user_regression_trains_keeps_best_and_resumes_bit_equal(project: Path, tmp_path: Path,
                                                                straight: Callable[[], Path]) -> None:

    runs = tmp_path / "runs"
    slower = "data.kwargs.delay_s=0.004"  # time to stop it between steps; the samples and the math stay the same
    cut = subprocess.Popen([sys.executable, "-m", "launcher", *_launch(runs, "cut", slower)], cwd=project,
                           env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    wait_until(lambda: reached_step(runs / "cut", 14, cut), "run cut to reach step 14", timeout=120, poll=0.02)
    os.kill(cut.pid, signal.SIGTERM)  # the launcher forwards it to torchrun, which forwards it to every rank
    out = cut.communicate(timeout=120)[0]
    stopped = read_result(runs / "cut")
    assert stopped["outcome"] == "preempted" and 14 <= stopped["step"] < 32, out
    again = user_cli(project, *_launch(runs, "cut", slower))  # the same command
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in (runs / "cut" / "logs" / "rank0.log").read_text()

    done = straight()  # it trained meanwhile, while the slowed data of run cut left the cores idle
    result = read_result(done)
    assert result["outcome"] == "completed" and "val/mae" in result and "val/acc" not in result, result
    maes = _val_mae(done)
    assert sorted(maes) == list(range(4, 33, 4)) and maes[32] < maes[4]  # it learned
    best = min(maes, key=lambda step: (maes[step], -step))  # retention breaks ties for the newer one
    assert _kept_steps(done) == {32, best}  # keep_last=1 plus the lowest val/mae, not the highest
    a, b = final_params(done), final_params(runs / "cut")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slurm
def test_user_regression_on_slurm_equals_the_local_run(slurm: None, project: Path, tmp_path: Path,
                                                       straight: Callable[[], Path]) -> None:
    """The same user package through the local Slurm: the import check on the login node, the package
    found on the compute node's ranks (code_dir), and the same weights as the run on this machine."""
    runs = tmp_path / "runs"
    on_slurm = user_cli(project, *_launch(runs, "onslurm"), "--cluster", "local_slurm", "--wait", timeout=600)
    assert on_slurm.returncode == 0, on_slurm.stdout + on_slurm.stderr
    result = read_result(runs / "onslurm")
    assert result["outcome"] == "completed" and result["step"] == 32 and "val/mae" in result, result
    assert "rank 1 of 2" in (runs / "onslurm" / "logs" / "rank1.log").read_text()
    local = straight()  # the same recipe, launched on this machine
    a, b = final_params(runs / "onslurm"), final_params(local)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert read_result(local)["val/mae"] == result["val/mae"]
