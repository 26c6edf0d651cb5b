"""Tier 1 (and one small tier 2): `launcher run` and script recipes up to the moment a run starts.

The recipe `launcher run` makes (name, verbatim arguments, layout, overrides), the command line's
`--` split, every bad input refused with one line and exit 2 before anything is written, the
cluster config's `shared_paths` checked by every command that starts runs, the `code_dir` key, and
`config_hash` ignoring top-level keys left unset.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from launcher.cli import main, parse_args
from launcher.runs import default_run_name
from launcher.scripts import script_recipe
from jobs.schema import RecipeConfig, config_hash, from_document, load_cluster, load_resolved, to_yaml
from jobs.schema.errors import ConfigError
from jobs.schema.names import check_name

ARGS = ["--lr", "0.1", "two words", "-x", "é ü 日本", "--", "", "null", "yes", "--flag=a b", "-"]
MODULE_PREFIX = "h3mod_"  # packages this file creates in its project folders: forgotten after each test


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project folder (the command's working directory) holding train.py; the runs directory
    given to commands is tmp_path/runs, which no refused command may create."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print('hello')\n")
    monkeypatch.chdir(folder)
    for var in ("LAUNCHER_CLUSTER", "LAUNCHER_RUNS_DIR"):
        monkeypatch.delenv(var, raising=False)
    yield folder
    for name in [m for m in sys.modules if m.startswith(MODULE_PREFIX)]:
        del sys.modules[name]


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    """Exit 2 with `error: ...` on one line (plus at most a HINT line) holding each expected text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, err
    assert len(lines) == 1 or lines[1].startswith("  HINT: "), err
    for text in expected:
        assert text in err, err
    return err


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


# ----------------------------------------------------------------------------- the recipe of `launcher run`
@pytest.mark.parametrize("script, module, name", [
    ("train.py", None, "train"), ("sub/dir/my_train.v2.py", None, "my_train.v2"), ("my train.py", None, "my-train"),
    (".hidden.py", None, "hidden"), ("日本.py", None, "script"), (None, "pkg.sub.finetune", "finetune"),
    (None, "toplevel", "toplevel"), ("x" * 300 + ".py", None, "x" * 108),
])
def test_recipe_name_comes_from_the_script(script: str | None, module: str | None, name: str) -> None:
    recipe = script_recipe(script, module, [], 1, 1, None, [])
    assert recipe.name == name
    check_name("default run name", default_run_name(recipe))  # what `launcher run` names the run


def test_script_arguments_are_kept_verbatim(tmp_path: Path) -> None:
    """As given after --, and the same after the trip through the run directory's config.yaml."""
    recipe = script_recipe("train.py", None, ARGS, 1, 1, None, [])
    assert recipe.script is not None and recipe.script.args == tuple(ARGS)
    (tmp_path / "config.yaml").write_text(to_yaml(recipe))
    reread = load_resolved(tmp_path / "config.yaml", RecipeConfig)
    assert reread.script is not None and reread.script.args == tuple(ARGS)
    assert reread.script.path == str(Path("train.py").absolute())


def test_layout_and_overrides() -> None:
    recipe = script_recipe(None, "pkg.train", ["--steps", "3"], 2, 3, "src",
                           ["checkpoint.uri=s3://bucket/prefix", "checkpoint.keep_last=1", "logging.tracker=wandb"])
    assert (recipe.parallel.nodes, recipe.parallel.procs_per_node, recipe.parallel.world_size) == (2, 3, 6)
    assert recipe.checkpoint.uri == "s3://bucket/prefix" and recipe.checkpoint.keep_last == 1
    assert recipe.logging.tracker == "wandb" and recipe.code_dir == "src"
    assert recipe.script is not None and (recipe.script.module, recipe.script.path) == ("pkg.train", None)


def test_overrides_change_the_default_run_name() -> None:
    """Another checkpoint folder or other arguments are another run, not a resume of this one."""
    names = {default_run_name(script_recipe("train.py", None, args, 1, 1, None, overrides))
             for args, overrides in [([], []), (["--lr", "1"], []), ([], ["checkpoint.uri=/x"])]}
    assert len(names) == 3


def test_script_recipe_file_is_shown(project: Path, capsys: pytest.CaptureFixture) -> None:
    (project / "recipes").mkdir()
    (project / "recipes" / "myscript.yaml").write_text(yaml.safe_dump(
        {"script": {"path": "train.py", "args": ["--steps", 3, "a b"]}, "parallel": {"procs_per_node": 2}}))
    assert main(["show", "myscript"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("# cluster")[0])
    assert shown["name"] == "myscript" and shown["parallel"]["procs_per_node"] == 2
    # the path is made absolute (from code_dir, here the launch directory); the arguments are strings
    assert shown["script"] == {"path": str(project / "train.py"), "module": None, "args": ["--steps", "3", "a b"],
                               "resume_args": [], "workdir": "run"}
    # only the sections a script run uses: the trainer's (model, data, optim, ...) are not read
    assert not set(shown) & {"model", "data", "loss", "metrics", "optim", "schedule", "trainer"}, shown
    assert {"checkpoint", "logging", "parallel"} <= set(shown)


def test_show_does_not_ask_where_the_code_lives(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`show` starts nothing: a cluster's shared_paths do not stop it from printing the configs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    assert main(["show", "digits", "--cluster", _cluster(tmp_path, "local", [str(shared)])]) == 0
    assert "shared_paths" in capsys.readouterr().out


def test_submit_without_sbatch_is_refused(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(tmp_path)
    _refused(capsys, ["run", "train.py", "--submit", "--runs-dir", str(tmp_path / "runs")], "--submit", "--sbatch")
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------- command line
def test_double_dash_splits_launcher_and_script_arguments() -> None:
    args = parse_args(["run", "train.py", "--procs-per-node", "2", "optim.lr=1", "--nodes", "3",
                       "--", "--nodes", "5", "--", "x=y", "--procs-per-node"])
    assert (args.script, args.module, args.nodes, args.procs_per_node) == ("train.py", None, 3, 2)
    assert args.overrides == ["optim.lr=1"]
    assert args.script_args == ["--nodes", "5", "--", "x=y", "--procs-per-node"]


def test_module_with_overrides() -> None:
    args = parse_args(["run", "-m", "pkg.mod", "checkpoint.uri=/tmp/c", "code_dir=src", "--run-name", "r",
                       "--", "a=b"])
    assert (args.script, args.module, args.run_name) == (None, "pkg.mod", "r")
    assert args.overrides == ["checkpoint.uri=/tmp/c", "code_dir=src"] and args.script_args == ["a=b"]


@pytest.mark.parametrize("argv, said", [
    (["run", "train.py", "--lr", "0.1"], ["'--lr'", "after --"]),
    (["run", "train.py", "--steps=3", "--", "x"], ["'--steps=3'", "after --"]),
    (["run"], ["give a script"]),
    (["run", "--procs-per-node", "2", "--", "train.py"], ["give a script"]),
    (["run", "optim.lr=1"], ["looks like an override"]),
])
def test_command_line_mistakes(argv: list[str], said: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in said), err


# ----------------------------------------------------------------------------- bad input: exit 2, nothing written
def _package(project: Path, name: str, init: str = "", **modules: str) -> None:
    (project / name).mkdir()
    (project / name / "__init__.py").write_text(init)
    for module, text in modules.items():
        (project / name / f"{module}.py").write_text(text)


BAD_RUNS = {
    "missing script": (["run", "nope.py"], ["script.path", "no such file", "nope.py"]),
    "script that is a directory": (["run", "h3mod_broken"], ["script.path", "is a directory", "h3mod_broken'"]),
    "unknown module": (["run", "-m", "h3mod_nowhere.train"], ["script.module", "h3mod_nowhere.train"]),
    "parent imports what is missing": (["run", "-m", "h3mod_broken.train"], ["script.module", "h3mod_broken"]),
    "parent raises": (["run", "-m", "h3mod_raises.train"], ["script.module", "RuntimeError", "boom"]),
    "parent exits": (["run", "-m", "h3mod_exits.train"], ["script.module", "SystemExit", "5"]),
    "package without __main__": (["run", "-m", "h3mod_plain"], ["script.module", "'h3mod_plain'", "__main__"]),
    "bad module name": (["run", "-m", "1pkg.train"], ["script.module", "'1pkg.train'"]),
    "module name with a slash": (["run", "-m", "pkg/train"], ["script.module", "'pkg/train'"]),
    "code_dir that does not exist": (["run", "train.py", "--code-dir", "nowhere"], ["code_dir", "nowhere"]),
    "code_dir that is a file": (["run", "train.py", "--code-dir", "train.py"], ["code_dir", "project/train.py'"]),
    "no ranks": (["run", "train.py", "--procs-per-node", "0"], ["parallel.procs_per_node", "0"]),
    "no nodes": (["run", "train.py", "--nodes", "-1"], ["parallel.nodes", "-1 must be > 0"]),
    "run name with a slash": (["run", "train.py", "--run-name", "a/b"], ["run name", "'a/b'"]),
    "run name ..": (["run", "train.py", "--run-name", ".."], ["run name", "'..'"]),
    "non-UTF-8 argument": (["run", "train.py", "--", "ok", "caf\udce9"], ["script.args[1]", "UTF-8"]),
    "unknown override key": (["run", "train.py", "checkpoint.urx=/x"], ["checkpoint.urx", "unknown key"]),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_run_is_refused_before_anything_is_written(case: str, project: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    _package(project, "h3mod_broken", "import h3mod_not_installed\n", train="")
    _package(project, "h3mod_raises", "raise RuntimeError('boom')\n", train="")  # user code may raise anything
    _package(project, "h3mod_exits", "raise SystemExit(5)\n", train="")
    _package(project, "h3mod_plain", train="")  # `python -m h3mod_plain` would fail on every rank
    argv, said = BAD_RUNS[case]
    before = _files(tmp_path)
    _refused(capsys, [argv[0], "--runs-dir", str(tmp_path / "runs"), *argv[1:]], *said)  # before any --
    assert _files(tmp_path) == before


@pytest.mark.parametrize("module", ["h3mod_app", "h3mod_app.train", "h3mod_single", "json.tool"])
def test_runnable_modules_are_accepted(module: str, project: Path) -> None:
    """What `python -m` runs: a package with __main__, a package's module, a top-level module, an installed one."""
    from launcher.preflight import resolve_code

    _package(project, "h3mod_app", __main__="", train="")
    (project / "h3mod_single.py").write_text("")
    recipe = script_recipe(None, module, [], 1, 1, None, [])
    assert resolve_code(recipe, "test") == recipe


@pytest.mark.parametrize("command", ["run", "launch"])
@pytest.mark.parametrize("own", ["jobs/__init__.py", "launcher/__init__.py", "jobs.py"])
def test_code_dir_that_would_shadow_the_launcher_is_refused(own: str, command: str, project: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """code_dir goes first on every rank's import path: a user's own `jobs` package (or `launcher`, or a
    jobs.py) there would replace ours on the ranks. Refused in one line naming the folder and the fix."""
    (project / own).parent.mkdir(exist_ok=True)
    (project / own).write_text("")
    name = own.split("/")[0].removesuffix(".py")
    argv = ["run", "train.py"] if command == "run" else ["launch", "digits"]
    before = _files(tmp_path)
    err = _refused(capsys, [argv[0], "--runs-dir", str(tmp_path / "runs"), *argv[1:]], "code_dir",
                   f"project/{own.split('/')[0]}'", f"replace the launcher's own '{name}' package", f"my_{name}")
    assert _files(tmp_path) == before, err


def test_a_folder_named_jobs_without_init_does_not_shadow(project: Path) -> None:
    """A plain `jobs/` folder (data, logs) is a namespace portion: our regular package still wins."""
    from launcher.preflight import resolve_code

    (project / "jobs").mkdir()
    (project / "jobs" / "notes.txt").write_text("")
    recipe = script_recipe("train.py", None, [], 1, 1, None, [])
    assert resolve_code(recipe, "test").script.path == str(project / "train.py")


BAD_RECIPES = {
    "both path and module": ({"script": {"path": "train.py", "module": "pkg.train"}}, ["script", "exactly one"]),
    "neither path nor module": ({"script": {"args": ["--lr", "1"]}}, ["script", "exactly one"]),
    "empty script section": ({"script": {}}, ["script", "exactly one"]),
    "missing script": ({"script": {"path": "sub/nope.py"}}, ["script.path", "project/sub/nope.py'"]),
    "code_dir that does not exist": ({"script": {"path": "train.py"}, "code_dir": "src"}, ["code_dir", "src"]),
    "empty code_dir": ({"script": {"path": "train.py"}, "code_dir": ""}, ["code_dir"]),
    "unknown script key": ({"script": {"path": "train.py", "argz": []}}, ["script.argz", "did you mean 'args'"]),
    "arguments not a list": ({"script": {"path": "train.py", "args": "--lr 1"}}, ["script.args", "expected a list"]),
    "a bool argument": ({"script": {"path": "train.py", "args": [True]}}, ["script.args[0]", "expected str"]),
}


@pytest.mark.parametrize("command", ["launch", "sbatch"])
@pytest.mark.parametrize("case", BAD_RECIPES)
def test_bad_script_recipe_is_refused_before_anything_is_written(case: str, command: str, project: Path,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (project / "recipes").mkdir()
    (project / "recipes" / "bad.yaml").write_text(yaml.safe_dump(BAD_RECIPES[case][0]))
    before = _files(tmp_path)
    _refused(capsys, [command, "bad", "--cluster", "local_slurm", "--runs-dir", str(tmp_path / "runs")],
             *BAD_RECIPES[case][1])
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------- cluster shared_paths
def _cluster(tmp_path: Path, backend: str, shared: list[str]) -> str:
    """A cluster config file listing `shared` as the folders every node sees."""
    path = tmp_path / f"{backend}_shared.yaml"
    config = {"backend": backend, "shared_paths": shared}
    if backend == "slurm":
        config["slurm"] = {"time_min": 10, "grace_period_s": 60}
    path.write_text(yaml.safe_dump(config))
    return str(path)


# each command that starts runs, with the cluster config's backend it runs under here
COMMANDS = {"launch": (["launch", "digits"], "local"), "run": (["run", "train.py"], "local"),
            "run --sbatch": (["run", "train.py", "--sbatch"], "slurm"), "sbatch": (["sbatch", "digits"], "slurm"),
            "sweep": (["sweep", "digits", "--grid", "optim.lr=0.1,0.2"], "local")}


@pytest.mark.parametrize("command", COMMANDS)
def test_code_dir_off_the_shared_file_system(command: str, project: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    argv, backend = COMMANDS[command]
    cluster = _cluster(tmp_path, backend, [str(shared)])
    before = _files(tmp_path)
    _refused(capsys, [*argv, "--cluster", cluster, "--runs-dir", str(shared / "runs")],
             "shared_paths", "code_dir", str(project))
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_runs_dir_off_the_shared_file_system(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    shared = tmp_path / "shared"
    (shared / "project").mkdir(parents=True)
    (shared / "project" / "train.py").write_text("print('hello')\n")
    monkeypatch.chdir(shared / "project")
    argv, backend = COMMANDS[command]
    cluster = _cluster(tmp_path, backend, [str(shared)])
    before = _files(tmp_path)
    runs = tmp_path / "a-long-folder-name-for-all-the-runs-of-this-project" / "runs"  # shown whole
    _refused(capsys, [*argv, "--cluster", cluster, "--runs-dir", str(runs)],
             "shared_paths", "runs directory", str(runs))
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", ["run --sbatch", "sbatch"])
def test_both_on_the_shared_file_system(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    shared = tmp_path / "shared"
    (shared / "project").mkdir(parents=True)
    (shared / "project" / "train.py").write_text("print('hello')\n")
    monkeypatch.chdir(shared / "project")
    argv, backend = COMMANDS[command]
    cluster = _cluster(tmp_path, backend, [str(tmp_path / "other"), f"{shared}/"])
    assert main([*argv, "--cluster", cluster, "--runs-dir", str(shared / "runs"), "--run-name", "r"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
    info = json.loads((shared / "runs" / "r" / "run.json").read_text())
    assert info["code_dir"] == str(shared / "project")


def test_shared_path_through_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """A listed folder that is a link (/home -> /mnt/home) holds what is found through it: code_dir and
    the runs directory are compared resolved."""
    (tmp_path / "real" / "project").mkdir(parents=True)
    (tmp_path / "real" / "project" / "train.py").write_text("print('hello')\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link" / "project")
    cluster = _cluster(tmp_path, "slurm", [str(tmp_path / "link")])
    argv = ["run", "train.py", "--sbatch", "--cluster", cluster, "--runs-dir", str(tmp_path / "link" / "runs")]
    assert main([*argv, "--run-name", "r"]) == 0, capsys.readouterr().err
    assert (tmp_path / "real" / "runs" / "r" / "run.json").is_file()


def test_relative_shared_path_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"shared_paths\[1\].*'shared/home' is not an absolute path"):
        load_cluster(_cluster(tmp_path, "local", ["/shared", "shared/home"]))


# ----------------------------------------------------------------------------- code_dir
USES_CODE_DIR = """\
import os, sys
import h3_helper  # lives only in code_dir
print(f"helper={h3_helper.VALUE} cwd={os.getcwd()} args={sys.argv[1:]!r}", flush=True)
"""


def _cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("how", ["run --code-dir", "launch a recipe with code_dir"])
def test_ranks_import_from_code_dir(how: str, project: Path, tmp_path: Path) -> None:
    """A 1-rank run of a script (in scripts/) that imports a module found only in code_dir (sub/)."""
    (project / "sub").mkdir()
    (project / "sub" / "h3_helper.py").write_text("VALUE = 'from-sub'\n")
    (project / "scripts").mkdir()
    (project / "scripts" / "use.py").write_text(USES_CODE_DIR)
    if how == "run --code-dir":
        argv = ["run", "scripts/use.py", "--code-dir", "sub/", "--run-name", "cd", "--", *ARGS]
    else:  # a recipe's script.path starts at code_dir
        (project / "recipes").mkdir()
        (project / "recipes" / "cd.yaml").write_text(yaml.safe_dump(
            {"code_dir": "sub/", "script": {"path": "../scripts/use.py", "args": ARGS}}, allow_unicode=True))
        argv = ["launch", "cd", "--run-name", "cd"]
    proc = _cli([*argv[:2], "--runs-dir", str(tmp_path / "runs"), *argv[2:]], project)  # before the script's --
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "cd"
    assert json.loads((run / "run.json").read_text())["code_dir"] == str(project / "sub")
    # the working directory is the run's own (script.workdir: run), where code_dir's files are seen through links
    said = f"helper=from-sub cwd={run / 'work'} args={ARGS!r}"
    assert said in (run / "logs" / "rank0.log").read_text() and said in proc.stdout
    assert (run / "work" / "h3_helper.py").resolve() == project / "sub" / "h3_helper.py"


def test_code_dir_in_the_home_directory(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`code_dir: ~/src` in a recipe is the home directory's src, as `runs_dir: ~/runs` is."""
    from launcher.preflight import resolve_code
    from launcher.runs import code_dir_of

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("")
    recipe = from_document(RecipeConfig, {"name": "r", "code_dir": "~/src", "script": {"path": "train.py"}}, "test")
    assert code_dir_of(recipe) == tmp_path / "src"
    assert resolve_code(recipe, "test").script.path == str(tmp_path / "src" / "train.py")


# ----------------------------------------------------------------------------- config_hash
OPTIONAL_TOP_LEVEL = {"script": {"path": "/x/train.py"}, "code_dir": "src", "metrics": {"mae": "pkg.m:mae"}}


def _without_optional_keys(recipe: RecipeConfig) -> object:
    """The same recipe as an instance of RecipeConfig as it was before its optional top-level keys existed."""
    kept = [f for f in dataclasses.fields(RecipeConfig) if f.name not in OPTIONAL_TOP_LEVEL]
    older = dataclasses.make_dataclass("RecipeConfig", [
        (f.name, object, dataclasses.field(default_factory=lambda v=getattr(recipe, f.name): v)) for f in kept])
    return older()


@pytest.mark.parametrize("recipe_name", ["digits", "vgg_pretrain"])
def test_config_hash_ignores_unset_top_level_keys(recipe_name: str) -> None:
    from jobs.schema import load_recipe

    recipe = load_recipe(recipe_name)
    assert all(getattr(recipe, key) is None for key in OPTIONAL_TOP_LEVEL)
    assert config_hash(recipe) == config_hash(_without_optional_keys(recipe))


@pytest.mark.parametrize("key", OPTIONAL_TOP_LEVEL)
def test_config_hash_counts_a_set_top_level_key(key: str) -> None:
    base = {"name": "r", "trainer": {"max_steps": 1}}
    unset = from_document(RecipeConfig, base, "test")
    if key == "script":
        set_ = from_document(RecipeConfig, {**base, "script": OPTIONAL_TOP_LEVEL["script"]}, "test")
    else:
        set_ = dataclasses.replace(unset, **{key: OPTIONAL_TOP_LEVEL[key]})
    assert config_hash(set_) != config_hash(unset)
    if key == "metrics":  # no metrics at all is not the default (accuracy)
        assert config_hash(dataclasses.replace(unset, metrics={})) != config_hash(unset)
