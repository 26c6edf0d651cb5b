"""Checks on the code's shape that keep the run directory one typed API (jobs.schema.run_dir.Run):
one module parses config.yaml/cluster.yaml, one opener builds a Run, one factory builds a run's
Checkpointer, and a Slurm rank parses each config file once. Each rule is checked against a planted
offence too, so a rule that no longer matches anything cannot pass by accident."""
from __future__ import annotations

import ast
import atexit
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO
from launcher.runs import prepare_run
from jobs.schema import load_cluster, load_recipe
from jobs.schema import run_dir as run_dir_module
from jobs.schema.run_dir import CLUSTER_YAML, CONFIG_YAML, Run, RunResult

PLANES = ("launcher", "jobs")
RUN_DIR_MODULE = "jobs/schema/run_dir.py"
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """Every module of both planes, by path relative to the repository."""
    return {str(path.relative_to(REPO)): path.read_text() for folder in PLANES
            for path in sorted((REPO / folder).rglob("*.py"))}


def _calls(source: str, name: str) -> Iterator[int]:
    """Lines that call `name` (as `name(...)` or `x.name(...)`); comments and strings do not count."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called == name:
                yield node.lineno


def _callers(name: str, modules: dict[str, str]) -> dict[str, list[int]]:
    return {path: lines for path, source in modules.items() if (lines := list(_calls(source, name)))}


def _file_names(source: str) -> Iterator[int]:
    """Lines with "config.yaml" or "cluster.yaml" as a string of their own (a path joined by hand);
    docstrings, comments and messages that mention the files do not count."""
    docstrings = {id(node.body[0].value) for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in (CONFIG_YAML, CLUSTER_YAML) and id(node) not in docstrings:
            yield node.lineno


# ----------------------------------------------------------------------------- the rules
def test_only_run_parses_the_run_directory_config_files() -> None:
    """config.yaml and cluster.yaml are read through `Run.recipe()` / `Run.cluster()`, nowhere else."""
    callers = _callers("load_resolved", _modules())
    assert set(callers) == {RUN_DIR_MODULE}, callers


def test_only_the_opener_builds_a_run() -> None:
    """`Run.at(folder)` (or `launcher.runs.run_at`, which checks the name) opens a run; nobody spells `Run(...)`."""
    modules = _modules()
    builders = {path: lines for path, lines in _callers("Run", modules).items() if path != RUN_DIR_MODULE}
    assert builders == {}
    assert list(_calls(modules[RUN_DIR_MODULE], "cls"))  # the opener itself: the rule looks at the right file


def test_one_factory_builds_a_runs_checkpointer() -> None:
    """`jobs.run_checkpointer.checkpointer_for` builds the Checkpointer of a run for training, export and
    scripts alike (bench/ measures the class itself, with no run, and is not counted)."""
    assert set(_callers("Checkpointer", _modules())) == {"jobs/run_checkpointer.py"}


def test_run_file_names_are_the_constants() -> None:
    offenders = {path: lines for path, source in _modules().items() if path != RUN_DIR_MODULE
                 and (lines := list(_file_names(source)))}
    assert offenders == {}


def test_no_module_is_over_400_lines() -> None:
    """A module that grows past this is split along a seam (a reader finds one thing per file)."""
    long = {path: n for path, source in _modules().items() if (n := len(source.splitlines())) > MAX_LINES}
    assert long == {}


# ----------------------------------------------------------------------------- each rule catches its offence
PLANTED = '''
"""A module that mentions config.yaml in its docstring: allowed."""
from jobs.schema import load_resolved, RecipeConfig
from jobs.schema import run_dir
from jobs.checkpoint import Checkpointer

def reader(folder):
    # load_resolved(folder) in a comment does not count
    recipe = load_resolved(folder / "config.yaml", RecipeConfig)
    run = run_dir.Run(folder.name, folder)
    return Checkpointer(recipe.checkpoint, folder, None, None), run, "cluster.yaml is named in a message"
'''


def test_the_rules_find_a_planted_offence() -> None:
    planted = {"launcher/planted.py": PLANTED}
    assert _callers("load_resolved", planted) == {"launcher/planted.py": [9]}
    assert _callers("Run", planted) == {"launcher/planted.py": [10]}
    assert _callers("Checkpointer", planted) == {"launcher/planted.py": [11]}
    assert list(_file_names(PLANTED)) == [9]


# ----------------------------------------------------------------------------- a rank reads each file once
@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The config files parsed from now on, by name."""
    seen: list[str] = []
    real = run_dir_module.load_resolved

    def counting(path: Path, cls: type) -> Any:
        seen.append(path.name)
        return real(path, cls)

    monkeypatch.setattr(run_dir_module, "load_resolved", counting)
    return seen


def test_a_run_parses_each_config_file_once(tmp_path: Path, parses: list[str]) -> None:
    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    opened = Run.at(run.dir)
    assert opened == run and opened.name == "r"
    assert opened.recipe() is opened.recipe() and opened.cluster() is opened.cluster()
    assert opened.recipe().name == "digits" and opened.cluster().name == "local"
    assert sorted(parses) == [CLUSTER_YAML, CONFIG_YAML]
    assert opened.written_config(CONFIG_YAML)["name"] == "digits"  # as written, for the doctor


def test_writing_the_configs_drops_what_was_parsed(tmp_path: Path) -> None:
    """A relaunch rewrites the configs: a Run that wrote them reads the new ones, as a rank would."""
    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    assert run.recipe().trainer.max_steps != 7
    run.write_configs(load_recipe("digits", ["trainer.max_steps=7"]), run.cluster())
    assert run.recipe().trainer.max_steps == 7
    (run.dir / CONFIG_YAML).write_text("[not, a, mapping")
    assert run.written_config(CONFIG_YAML) == {}


@pytest.mark.parametrize("script", [True, False])
def test_a_slurm_rank_parses_each_config_file_once(tmp_path: Path, parses: list[str], script: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Slurm task decides between script and trainer from config.yaml, then passes the Run it opened
    on: the entry point it calls reads the same parsed configs."""
    from jobs.environments import slurm

    recipe = load_recipe("digits")
    if script:
        from launcher.scripts import script_recipe

        recipe = script_recipe("train.py", None, [], 1, 1, None, [])
    run_dir = prepare_run(recipe, load_cluster("local"), "r", tmp_path, "auto").dir
    handed: list[Run] = []

    def entry(run: Any, **_: Any) -> RunResult:  # the rank's entry point, as far as the configs go
        assert isinstance(run, Run)
        run.recipe(), run.cluster()
        handed.append(run)
        return RunResult(outcome="completed")

    job = types.SimpleNamespace(global_rank=0, local_rank=0, num_tasks=1, num_nodes=1, hostnames=["localhost"],
                                raw_job_id="7")
    monkeypatch.setitem(sys.modules, "submitit.slurm.slurm",
                        types.SimpleNamespace(SlurmJobEnvironment=lambda: job))
    for key in (*slurm.ENV_MAP, "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # rank_main sets them: put back afterwards
    monkeypatch.setattr("jobs.script.run_script", entry)
    monkeypatch.setattr("jobs.train.run_training", entry)
    monkeypatch.setattr(atexit, "register", lambda *_: None)  # exit_cleanly would end this test process
    assert slurm.rank_main(str(run_dir)).outcome == "completed"
    assert len(handed) == 1 and handed[0].dir == run_dir
    assert sorted(parses) == [CLUSTER_YAML, CONFIG_YAML]
    assert Run.at(run_dir).info().state == "completed"
