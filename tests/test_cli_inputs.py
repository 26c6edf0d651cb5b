"""Tier 1: the command line as a careless user or an attacker types it.

Overrides may come anywhere among the options; names (runs, recipes, sweeps) are one path component
under one rule (jobs/schema/names.py), and a refused one exits 2 with one line (plus a HINT) and creates
nothing; recipe and cluster names are compared with file names, never used as glob patterns.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from launcher.cli import main, parse_args
from jobs.schema.errors import UsageError
from jobs.schema.names import MAX_LENGTH, check_name

BAD_NAMES = ["../x", "..", ".", "a/b", "-x", "", "run\nx", "run\n", "a b", "a" * 300, "a" * (MAX_LENGTH + 1)]


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    """Exit 2, `error: ...` on one line plus at most a HINT line, each expected text in it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, err
    assert len(lines) == 1 or lines[1].startswith("  HINT: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def _nothing_created(tmp_path: Path, runs_dir: Path) -> None:
    assert [p for p in tmp_path.rglob("*")] == [runs_dir]


# ----------------------------------------------------------------------------- overrides anywhere
@pytest.mark.parametrize("argv", [
    ["launch", "digits", "--cluster", "local", "trainer.epochs=2", "--run-name", "x", "optim.lr=0.1", "--wait"],
    ["launch", "--cluster", "local", "digits", "trainer.epochs=2", "--wait", "optim.lr=0.1", "--run-name", "x"],
    ["sbatch", "digits", "--run-name", "x", "trainer.epochs=2", "--cluster", "local", "optim.lr=0.1"],
])
def test_overrides_anywhere_among_run_options(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.recipe, args.overrides, args.run_name, args.cluster) == \
        ("digits", ["trainer.epochs=2", "optim.lr=0.1"], "x", "local")


def test_overrides_anywhere_in_a_sweep() -> None:
    """--grid and --random take values; those are theirs, every other `k=v` is an override."""
    args = parse_args(["sweep", "--grid", "optim.lr=1e-3,1e-2", "digits", "trainer.max_steps=2",
                       "--random", "model.dropout=uniform:0:0.5", "--trials", "2", "optim.momentum=0.5",
                       "--grid", "trainer.seed=0,1", "--cluster", "local"])
    assert args.recipe == "digits" and args.overrides == ["trainer.max_steps=2", "optim.momentum=0.5"]
    assert args.grid == ["optim.lr=1e-3,1e-2", "trainer.seed=0,1"]
    assert args.random == ["model.dropout=uniform:0:0.5"] and args.trials == 2


def test_show_with_overrides_after_cluster(capsys: pytest.CaptureFixture) -> None:
    assert main(["show", "digits", "--cluster", "local_slurm", "trainer.epochs=3", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out.split("# cluster")[0])
    assert shown["trainer"]["epochs"] == 3 and shown["optim"]["lr"] == 0.5 and "# cluster local_slurm" in out


def test_sbatch_with_overrides_after_run_name(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["sbatch", "digits", "--run-name", "x", "optim.lr=0.01", "--cluster", "local_slurm",
            "--runs-dir", str(runs_dir)]
    assert main(argv) == 0
    assert "srun" in capsys.readouterr().out
    assert yaml.safe_load((runs_dir / "x" / "config.yaml").read_text())["optim"]["lr"] == 0.01


def test_unknown_option_is_still_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["launch", "digits", "--bogus", "trainer.epochs=2"])
    assert exit_.value.code == 2


# ----------------------------------------------------------------------------- the name rule
@pytest.mark.parametrize("name", ["digits-1a2b3c4d", "a", "A.b_c-9", "x" * MAX_LENGTH, "run..1"])
def test_valid_names(name: str) -> None:
    assert check_name("run name", name) == name


@pytest.mark.parametrize("name", BAD_NAMES + ["/abs", "run\udcff", "_x", "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError) as err:
        check_name("run name", name)
    message = str(err.value)
    assert message.startswith("run name ") and "HINT: use 1 to 128 characters" in message
    assert len(message.splitlines()[0]) < 140  # the value is shown truncated


@pytest.mark.parametrize("name", BAD_NAMES + ["ABS"])
@pytest.mark.parametrize("command", ["launch", "sbatch"])
def test_bad_run_name_creates_nothing(command: str, name: str, tmp_path: Path, runs_dir: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    name = str(tmp_path / "abs") if name == "ABS" else name
    cluster = "local_slurm" if command == "sbatch" else "local"
    # `--run-name=NAME`: as two words argparse would take `-x` for an option
    _refused(capsys, [command, "digits", "trainer.max_steps=1", "--cluster", cluster, f"--run-name={name}",
                      "--runs-dir", str(runs_dir)],
             "run name (--run-name)", repr(name)[:40], "is not a valid name")
    _nothing_created(tmp_path, runs_dir)


@pytest.mark.parametrize("name", ["../x", "..", "a" * 300, "run\nx", "ABS"])
@pytest.mark.parametrize("command", [["status"], ["logs"], ["cancel"], ["stacks"], ["export", "--to", "out.pt"],
                                     ["sweep-status"]])
def test_bad_run_argument_is_refused(command: list[str], name: str, tmp_path: Path, runs_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    name = str(tmp_path / "abs") if name == "ABS" else name
    kind = "sweep" if command[0] == "sweep-status" else "run"
    _refused(capsys, [command[0], name, *command[1:], "--runs-dir", str(runs_dir)], f"{kind} ", "is not a valid name")
    _nothing_created(tmp_path, runs_dir)


def test_non_utf8_run_name_from_the_command_line(tmp_path: Path, runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "trainer.max_steps=1", "--run-name", b"run\xff", runs_dir=runs_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: run name (--run-name) 'run\\udcff' is not a valid name")
    _nothing_created(tmp_path, runs_dir)


@pytest.mark.parametrize("name", ["../s", "..", "s\n", "a" * 300])
def test_bad_sweep_name_creates_nothing(name: str, tmp_path: Path, runs_dir: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    _refused(capsys, ["sweep", "digits", "trainer.max_steps=1", "--grid", "optim.lr=0.1,0.2", f"--name={name}",
                      "--runs-dir", str(runs_dir)], "sweep name (--name)", "is not a valid name")
    _nothing_created(tmp_path, runs_dir)


def test_sweep_name_too_long_for_its_trial_names(tmp_path: Path, runs_dir: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """`<sweep>-tNN` is a run name too: a 127-character sweep name leaves no room for `-t00`."""
    _refused(capsys, ["sweep", "digits", "trainer.max_steps=1", "--grid", "optim.lr=0.1,0.2", "--name", "s" * 127,
                      "--runs-dir", str(runs_dir)], "trial run name", "is not a valid name")
    _nothing_created(tmp_path, runs_dir)


@pytest.mark.parametrize("command", [["show"], ["launch"], ["sbatch", "--cluster", "local_slurm"],
                                     ["sweep", "--grid", "optim.lr=0.1,0.2"]])
def test_recipe_whose_name_is_a_path_creates_nothing(command: list[str], tmp_path: Path, runs_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "evil.yaml"
    data = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "digits.yaml").read_text())
    recipe.write_text(yaml.safe_dump({**data, "name": "../../evil", "trainer": {**data["trainer"], "max_steps": 1}}))
    _refused(capsys, [command[0], str(recipe), *command[1:], "--runs-dir", str(runs_dir)],
             "recipe name" if command[0] != "sbatch" else "default run name", "'../../evil")
    assert sorted(tmp_path.rglob("*")) == sorted([runs_dir, recipe])


def test_negative_seed_of_a_bayesian_sweep_creates_nothing(tmp_path: Path, runs_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """numpy's SeedSequence behind every trial's sampler takes no negative seed: it raised in the worker, after
    the sweep's folder and study existed (found by test_cli_fuzz)."""
    _refused(capsys, ["sweep", "digits", "--search", "bayes", "--param", "optim.lr=uniform:0.01:0.1", "--trials", "1",
                      "--seed", "-1", "--runs-dir", str(runs_dir)], "--seed -1 must be >= 0")
    _nothing_created(tmp_path, runs_dir)


@pytest.mark.parametrize("option", ["--code-dir", "code_dir"])
def test_code_dir_too_long_for_the_file_system(option: str, tmp_path: Path, runs_dir: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """pathlib's is_dir raises ENAMETOOLONG (it says False only for a missing path): a traceback before."""
    (tmp_path / "s.py").write_text("")
    given = ["--code-dir", "x" * 300] if option == "--code-dir" else ["code_dir=" + "x" * 300]
    _refused(capsys, ["run", str(tmp_path / "s.py"), *given, "--runs-dir", str(runs_dir)],
             "code_dir: ", "File name too long")
    assert sorted(tmp_path.rglob("*")) == sorted([runs_dir, tmp_path / "s.py"])


# ----------------------------------------------------------------------------- names are not patterns
@pytest.mark.parametrize("pattern", ["*", "?igits", "[d]igits", "digit*"])
def test_recipe_name_is_not_a_glob(pattern: str, capsys: pytest.CaptureFixture) -> None:
    _refused(capsys, ["show", pattern], f"unknown recipe {pattern!r}")


@pytest.mark.parametrize("pattern", ["*", "?ocal", "[l]ocal", "local*"])
def test_cluster_name_is_not_a_glob(pattern: str, capsys: pytest.CaptureFixture) -> None:
    _refused(capsys, ["show", "digits", "--cluster", pattern], f"unknown cluster config {pattern!r}")


def test_recipe_path_too_long_for_the_file_system(capsys: pytest.CaptureFixture) -> None:
    err = _refused(capsys, ["show", "x" * 300 + ".yaml"], "cannot read recipe file")
    assert len(err) < 300  # the path is shown truncated


def test_unknown_recipe_name_is_shown_truncated(capsys: pytest.CaptureFixture) -> None:
    err = _refused(capsys, ["show", "y" * 5000], "unknown recipe 'yyy", "(5000 characters)")
    assert len(err) < 500


# ----------------------------------------------------------------------------- logs that are not UTF-8
def test_logs_with_non_utf8_bytes(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (runs_dir / "r" / "logs").mkdir(parents=True)
    (runs_dir / "r" / "run.json").write_text(json.dumps({"run_name": "r", "backend": "local"}))
    (runs_dir / "r" / "logs" / "rank0.log").write_bytes(b"step 1 ok\nbad \xff\xfe bytes\nstep 2 ok\n")
    assert main(["logs", "r", "--runs-dir", str(runs_dir)]) == 0
    assert capsys.readouterr().out == "step 1 ok\nbad \ufffd\ufffd bytes\nstep 2 ok\n"
