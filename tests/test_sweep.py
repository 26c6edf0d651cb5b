"""Hyper-parameter sweeps: pure tests of the search space and naming, refusals through the CLI,
a real local 2-trial sweep, and a real Slurm job array of 4 trials (the `slurm` fixture of conftest.py
starts the local Slurm, and skips only where it cannot run)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from conftest import read_result, run_cli
from launcher.cli import main
from jobs.schema import load_cluster, load_recipe
from jobs.schema.errors import UsageError
from launcher import backends
from launcher.backends import slurm
from launcher.backends.slurm_watch import expand_job_ids
from jobs.schema.run_dir import Run
from launcher.sweeps.space import SweepSpec, default_sweep_name, expand, split_values
from launcher.sweeps.table import sort_rows, trial_state

QUICK = ["trainer.max_steps=10", "trainer.epochs=null", "parallel.procs_per_node=1", "trainer.global_batch=32"]


def _spec(grid: tuple[str, ...] = (), rand: tuple[str, ...] = (), trials: int = 1, seed: int = 0,
          fixed: tuple[str, ...] = ()) -> SweepSpec:
    return SweepSpec("digits", fixed, grid, rand, trials, seed)


def _values(trials: list, key: str) -> list[str]:
    return [dict(o.split("=", 1) for o in t.overrides)[key] for t in trials]


def _table(stdout: str, metric: str = "val/acc") -> list[list[str]]:
    """Rows of the sweep-status table (after its header line), split on runs of spaces."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial ") and metric in line)
    rows = []
    for line in lines[start + 1:]:
        if not re.match(r"\S+-t\d+\s", line):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


# ----------------------------------------------------------------------------- tier 1: pure
def test_grid_is_the_cartesian_product_in_command_line_order() -> None:
    trials = expand(_spec(grid=("optim.lr=1e-3,1e-2", "trainer.micro_batch=16,32")), "s")
    assert [t.name for t in trials] == ["s-t00", "s-t01", "s-t02", "s-t03"]
    assert [t.overrides for t in trials] == [
        ("optim.lr=1e-3", "trainer.micro_batch=16"), ("optim.lr=1e-3", "trainer.micro_batch=32"),
        ("optim.lr=1e-2", "trainer.micro_batch=16"), ("optim.lr=1e-2", "trainer.micro_batch=32")]
    assert [t.name for t in expand(_spec(grid=("trainer.seed=" + ",".join(map(str, range(120))),)), "s")][-1] \
        == "s-t119"  # wider numbers once there are more than 100 trials


def test_grid_values_parse_like_overrides() -> None:
    assert split_values("[0.9,0.99],[0.8, 0.9]") == ["[0.9,0.99]", "[0.8, 0.9]"]  # YAML lists stay whole
    trials = expand(_spec(grid=("optim.lr=1e-3,1e-2", "trainer.epochs=null,2")), "s")
    recipes = [load_recipe("digits", list(t.overrides) + ["trainer.max_steps=5"]) for t in trials]
    assert [r.optim.lr for r in recipes] == [1e-3, 1e-3, 1e-2, 1e-2]  # `1e-3` (a YAML 1.1 string) becomes a float
    assert [r.trainer.epochs for r in recipes] == [None, 2, None, 2]
    betas = expand(_spec(grid=("optim.betas=[0.9,0.99],[0.8,0.9]",)), "s")
    assert load_recipe("digits", list(betas[1].overrides)).optim.betas == (0.8, 0.9)


def test_random_search_is_seeded_and_within_bounds() -> None:
    rand = ("optim.lr=loguniform:1e-4:1e-1", "model.dropout=uniform:0:0.5", "trainer.micro_batch=choice:16,32",
            "trainer.seed=randint:3:5")
    trials = expand(_spec(rand=rand, trials=300, seed=0), "s")
    assert len(trials) == 300 and trials == expand(_spec(rand=rand, trials=300, seed=0), "s")
    assert _values(trials, "optim.lr") != _values(expand(_spec(rand=rand, trials=300, seed=1), "s"), "optim.lr")
    lrs = [float(v) for v in _values(trials, "optim.lr")]
    assert all(1e-4 <= x <= 1e-1 for x in lrs)
    # log-uniform: each decade holds about a third; a uniform draw would put ~90% in the top decade
    for low, high in ((1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1e-1)):
        assert 0.2 < sum(low <= x < high for x in lrs) / len(lrs) < 0.47, (low, high)
    dropouts = [float(v) for v in _values(trials, "model.dropout")]
    assert all(0 <= x <= 0.5 for x in dropouts) and max(dropouts) > 0.4 and min(dropouts) < 0.1
    assert set(_values(trials, "trainer.micro_batch")) == {"16", "32"}
    assert set(_values(trials, "trainer.seed")) == {"3", "4", "5"}
    recipe = load_recipe("digits", list(trials[0].overrides))  # samples are valid override values
    assert recipe.optim.lr == lrs[0] and recipe.trainer.micro_batch in (16, 32)


def test_random_samples_per_grid_point() -> None:
    trials = expand(_spec(grid=("optim.name=sgd,adamw",), rand=("optim.lr=uniform:0.01:0.1",), trials=3), "s")
    assert _values(trials, "optim.name") == ["sgd"] * 3 + ["adamw"] * 3
    assert len(set(_values(trials, "optim.lr"))) == 6


@pytest.mark.parametrize("grid,rand,trials,message", [
    ((), (), 1, "at least one --grid"),
    (("optim.lr",), (), 1, "expected KEY=VALUES"),
    (("optim.lr=0.1,,0.2",), (), 1, "empty value"),
    (("optim.lr=0.1,0.2",), ("optim.lr=uniform:0:1",), 1, "optim.lr given more than once"),
    ((), ("optim.lr=normal:0:1",), 2, "unknown distribution 'normal'"),
    ((), ("optim.lr=uniform:0.5:0.1",), 2, "LOW < HIGH"),
    ((), ("optim.lr=loguniform:0:0.1",), 2, "loguniform bounds must be > 0"),
    ((), ("optim.lr=uniform:a:b",), 2, "two float bounds"),
    ((), ("trainer.micro_batch=choice:",), 2, "choice needs values"),
    (("optim.lr=0.1,0.2",), (), 3, "needs --random"),
    (("optim.lr=0.1,0.2\n",), (), 1, "control character '\\n'"),  # a newline ran trials (issue 23)
    (("optim.name=sgd,\x1b[2Jadamw",), (), 1, "control character '\\x1b'"),
    ((), ("trainer.micro_batch=choice:16,\r32",), 2, "control character '\\r'"),
    ((), ("optim.lr=uniform:0:1",), 100000, "the sweep has 100000 trials (--trials 100000), more than 1000"),
    (tuple(f"k{i}=" + ",".join("0123456789") for i in range(10)), (), 1, "10000000000 trials (10 x 10 x"),
    ((), ("trainer.seed=choice:" + ",".join(map(str, range(101))),), 2, "choice:...: 101 values, more than 100"),
])
def test_bad_sweep_specs_are_refused(grid: tuple, rand: tuple, trials: int, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        expand(_spec(grid=grid, rand=rand, trials=trials), "s")


def test_default_sweep_name_is_stable_and_follows_the_spec() -> None:
    spec = _spec(grid=("optim.lr=1e-3,1e-2",), fixed=("trainer.max_steps=10",))
    name = default_sweep_name(spec)
    assert re.fullmatch(r"digits-sweep-[0-9a-f]{8}", name)
    assert name == default_sweep_name(_spec(grid=("optim.lr=1e-3,1e-2",), fixed=("trainer.max_steps=10",)))
    others = {default_sweep_name(s) for s in (
        _spec(grid=("optim.lr=1e-3,1e-1",), fixed=("trainer.max_steps=10",)),
        _spec(grid=("optim.lr=1e-3,1e-2",), fixed=("trainer.max_steps=20",)),
        _spec(grid=("optim.lr=1e-3,1e-2",), fixed=("trainer.max_steps=10",), seed=1))}
    assert len(others) == 3 and name not in others


def test_slurm_array_needs_one_resource_shape() -> None:
    cluster = load_cluster("local_slurm")
    trials = expand(_spec(grid=("parallel.procs_per_node=1,2",)), "s")
    recipes = [load_recipe("digits", list(t.overrides)) for t in trials]
    with pytest.raises(UsageError, match="same resources") as err:
        slurm.check_many([(t.name, r) for t, r in zip(trials, recipes)], cluster)
    assert "parallel.procs_per_node" in str(err.value)
    same = expand(_spec(grid=("optim.lr=0.1,0.2",)), "s")
    slurm.check_many([(t.name, load_recipe("digits", list(t.overrides))) for t in same], cluster)


def test_rows_sort_best_first_with_missing_metric_last() -> None:
    rows = [{"run": n, "metric": m} for n, m in (("a", None), ("b", 0.5), ("c", 0.9), ("d", 0.1))]
    assert [r["run"] for r in sort_rows(rows, "max")] == ["c", "b", "d", "a"]
    assert [r["run"] for r in sort_rows(rows, "min")] == ["d", "b", "c", "a"]


def test_sacct_array_notation_expands_to_elements() -> None:
    assert expand_job_ids("15_[0-2,5%4]") == ["15_0", "15_1", "15_2", "15_5"]
    assert expand_job_ids("15_[3]") == ["15_3"]
    assert expand_job_ids("9_1") == ["9_1"] and expand_job_ids("16") == ["16"]


# ----------------------------------------------------------------------------- refusals through the CLI
def test_bad_trial_is_refused_before_anything_exists(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["sweep", "digits", "trainer.max_steps=5", "--grid", "optim.lr=0.1,0.01",
                 "--grid", "model.dropout=0.2,1.5", "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"trial digits-sweep-[0-9a-f]{8}-t01 \(optim.lr=0.1 model.dropout=1.5\)", err), err
    assert "model.dropout: 1.5 must be between 0 and 1" in err and "nothing was created" in err
    assert list(runs_dir.iterdir()) == []
    code = main(["sweep", "digits", "--grid", "optim.lrr=0.1,0.01", "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "-t00" in err and "optim.lrr: unknown key" in err and "did you mean 'lr'" in err
    assert list(runs_dir.iterdir()) == []


def test_varying_parallel_on_slurm_is_refused(runs_dir: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "check", lambda recipe, cluster: None)  # no sbatch needed to refuse
    code = main(["sweep", "digits", "--grid", "parallel.procs_per_node=1,2", "--cluster", "local_slurm",
                 "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "job array" in err and "parallel.procs_per_node" in err
    assert list(runs_dir.iterdir()) == []


def test_sweep_status_of_an_unknown_sweep_lists_the_known_ones(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (runs_dir / "sweeps").mkdir()
    (runs_dir / "sweeps" / "digits-sweep-0badc0de.json").write_text("{}")
    assert main(["sweep-status", "nope", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert "no such sweep" in err and "digits-sweep-0badc0de" in err


@pytest.mark.parametrize("trials", [[{"run_name": "../outside", "overrides": []}],
                                    [{"run_name": "/etc", "overrides": []}],
                                    [{"overrides": []}], ["t0"], {"run_name": "t0"}])
def test_a_sweep_record_with_a_bad_trial_name_is_refused(runs_dir: Path, trials: object,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Every reader of a sweep record builds run folders from its trials' names: a damaged or planted name
    never becomes a path (`..`, an absolute path), whatever command reads it."""
    (runs_dir / "sweeps").mkdir()
    (runs_dir / "sweeps" / "s.json").write_text(json.dumps({"name": "s", "trials": trials}))
    before = sorted(runs_dir.rglob("*"))
    assert main(["sweep-status", "s", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "s.json" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if not line.lstrip().startswith("HINT")]) == 1, err
    assert sorted(runs_dir.rglob("*")) == before


def test_random_without_trials_is_refused(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "digits", "--random", "optim.lr=loguniform:1e-4:1e-1", "--runs-dir", str(runs_dir)]) == 2
    assert "--trials" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tier 2: real runs
@pytest.mark.slow  # training runs through the real CLI
def test_local_sweep_runs_each_trial_and_ranks_them(runs_dir: Path) -> None:
    args = ["sweep", "digits", *QUICK, "--grid", "optim.lr=0.01,0.1"]
    proc = run_cli(*args, runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = re.search(r"sweep (digits-sweep-[0-9a-f]{8}): 2 trials", proc.stdout).group(1)
    record = json.loads((runs_dir / "sweeps" / f"{name}.json").read_text())
    assert record["recipe"] == "digits" and record["cluster"] == "local"
    assert [(t["run_name"], t["overrides"]) for t in record["trials"]] == [
        (f"{name}-t00", ["optim.lr=0.01"]), (f"{name}-t01", ["optim.lr=0.1"])]
    accs = {}
    for trial in record["trials"]:
        run_dir = runs_dir / trial["run_name"]
        result = read_result(run_dir)
        assert result["outcome"] == "completed" and result["step"] == 10
        assert any((run_dir / "checkpoints").glob("step-*"))  # each trial has its own checkpoints
        accs[trial["run_name"]] = result["val/acc"]
    assert load_recipe(str(runs_dir / f"{name}-t01" / "config.yaml")).optim.lr == 0.1

    rows = _table(proc.stdout)
    assert [r[0] for r in rows] == sorted(accs, key=accs.get, reverse=True)  # best first
    assert all(r[1] == "completed" and r[2] == "10" for r in rows)
    assert [float(r[3]) for r in rows] == pytest.approx(sorted(accs.values(), reverse=True), abs=1e-4)

    status = run_cli("sweep-status", name, "--metric", "val/loss", "--mode", "min", runs_dir=runs_dir)
    assert status.returncode == 0, status.stderr
    losses = [float(r[3]) for r in _table(status.stdout, "val/loss")]
    assert len(losses) == 2 and losses == sorted(losses)

    again = run_cli(*args, runs_dir=runs_dir)  # same command: same sweep, nothing to run again
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already completed; not started again") == 2 and "0 to run" in again.stdout
    assert json.loads((runs_dir / f"{name}-t00" / "run.json").read_text())["launches"] == 1


@pytest.mark.slurm
def test_slurm_sweep_is_one_job_array(runs_dir: Path, slurm: None) -> None:
    proc = run_cli("sweep", "digits", "trainer.max_steps=15", "trainer.epochs=null", "--grid", "optim.lr=0.05,0.1",
                   "--grid", "trainer.seed=0,1", "--cluster", "local_slurm", "--wait", runs_dir=runs_dir, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"submitted Slurm job array (\d+) \(4 trials\)", proc.stdout).group(1)
    name = re.search(r"sweep (digits-sweep-[0-9a-f]{8}): 4 trials", proc.stdout).group(1)
    record = json.loads((runs_dir / "sweeps" / f"{name}.json").read_text())
    assert record["arrays"] == [array]
    ports = set()
    for i, trial in enumerate(record["trials"]):
        info = json.loads((runs_dir / trial["run_name"] / "run.json").read_text())
        assert trial["job_id"] == info["job_id"] == f"{array}_{i}" and info["job_ids"] == [f"{array}_{i}"]
        assert info["state"] == "completed" and read_result(runs_dir / trial["run_name"])["step"] == 15
        log = (runs_dir / trial["run_name"] / "logs" / "rank0.log").read_text()
        ports.add(re.search(r"process group: gloo, 2 ranks, rendezvous \S+:(\d+)", log).group(1))
    assert len(ports) == 4  # concurrent array elements on one node rendezvous on their own ports

    status = run_cli("sweep-status", name, "--cluster", "local_slurm", runs_dir=runs_dir)
    assert status.returncode == 0, status.stderr
    rows = _table(status.stdout)
    assert sorted(r[0] for r in rows) == [t["run_name"] for t in record["trials"]]
    assert all(r[1] == "completed" and r[2] == "15" for r in rows), rows
    accs = [float(r[3]) for r in rows]
    assert accs == sorted(accs, reverse=True)

    trial = run_cli("status", f"{name}-t02", "--cluster", "local_slurm", runs_dir=runs_dir)
    assert f"job_id: {array}_2" in trial.stdout and "slurm_state: COMPLETED" in trial.stdout


@pytest.mark.slurm
def test_array_element_cancelled_while_pending_is_not_unknown(tmp_path: Path, slurm: None) -> None:
    """sacct has no row for `<array>_1` when the array was cancelled before the element started."""
    import subprocess

    array = subprocess.run(["sbatch", "--parsable", "--hold", "--array=0-2", "-p", "debug", "-o", "/dev/null",
                            "--wrap", "true"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    subprocess.run(["scancel", array], check=True)
    run = Run("t", tmp_path / "t")
    run.dir.mkdir()
    run.update(backend="slurm", job_id=f"{array}_1")
    deadline = time.monotonic() + 30
    while (state := trial_state(run)) == "unknown" and time.monotonic() < deadline:
        time.sleep(0.5)  # accounting lags a moment behind scancel
    assert state == "cancelled"
    assert backends.status(run)["state"] == "cancelled"  # `launcher status <trial>` sees it too


@pytest.mark.slurm
def test_job_array_sbatch_refuses_is_one_line_and_leaves_no_trial(runs_dir: Path, tmp_path: Path, slurm: None) -> None:
    """The local Slurm has no GPUs, so sbatch refuses the array: exit 2, one line and a HINT, no trial directory."""
    cluster = yaml.safe_load((Path(__file__).parent.parent / "cluster_configs" / "local_slurm.yaml").read_text())
    cluster["slurm"]["gpus_per_node"] = 1
    path = tmp_path / "gpu_slurm.yaml"
    path.write_text(yaml.safe_dump(cluster))
    proc = run_cli("sweep", "digits", "parallel.procs_per_node=1", "--grid", "optim.lr=0.1,0.2", "--cluster", str(path),
                   "--name", "nogpu", runs_dir=runs_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-2].startswith("error: sbatch refused the job array of nogpu: sbatch: error:"), proc.stderr
    assert lines[-1].startswith("  HINT: "), proc.stderr
    assert not (runs_dir / "nogpu-t00").exists() and not (runs_dir / "nogpu-t01").exists()


def test_a_running_trial_shows_the_value_at_its_highest_logged_step(tmp_path: Path) -> None:
    """A trial without a result yet is shown with its latest logged value (marked *). A resumed run logs
    the steps after its checkpoint again: the latest is the highest step, not the last line of the file."""
    from launcher.sweeps.table import trial_rows

    run = tmp_path / "s-t00"
    run.mkdir()
    rows = [{"step": 10, "val/acc": 0.5}, {"step": 20, "val/acc": 0.7}, {"step": 30, "val/acc": 0.8},
            {"step": 20, "val/acc": 0.6}]  # preempted after 30, resumed from the checkpoint at 10
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"trials": [{"run_name": "s-t00", "overrides": ["optim.lr=0.1"], "state": "running"},
                         {"run_name": "s-t01", "overrides": ["optim.lr=0.2"], "state": "not started"}]}
    shown = trial_rows(tmp_path, record, "val/acc")
    assert [(r["step"], r["metric"], r["final"]) for r in shown] == [(30, 0.8, False), (None, None, False)]
