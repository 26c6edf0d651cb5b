"""Bayesian sweeps (Optuna TPE, ASHA pruning, a journal file): the worker loop against a real journal with
stand-in trials (seeded suggestions, resuming, telling, sweep-status), rank 0's pruning rule against a real
journal (its rungs and the top-third rule), refusals through the CLI, and real
digits trials through the CLI: a pruned trial on 2 ranks, a trial killed mid-run that resumes as the same
trial, and workers as a Slurm job array."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, max_logged_step, read_result, run_cli, wait_until
from jobs.training.pruning import TrialReporter
from jobs.training.state import TrainState
from launcher.cli import main
from launcher.preflight import Target
from launcher.sweeps.bayes import BayesSpec, Sweep, trial_name, work
from launcher.sweeps.bayes.spec import corners, distributions
from jobs.schema import RecipeConfig
from jobs.schema.errors import UsageError
from jobs.schema.run_dir import Run, RunResult, committed_steps
from jobs.schema.study import STUDY_JOURNAL, TrialTicket, journal_storage, load_study

SPACE = ("optim.lr=loguniform:1e-4:1e-1", "model.dropout=uniform:0:0.5", "trainer.micro_batch=choice:16,32")
QUICK = ["parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=40", "trainer.eval_every=5"]


def _sweep(root: Path, name: str, seed: int = 0, trials: int = 8, prune: bool = False) -> Sweep:
    spec = BayesSpec("digits", ("trainer.max_steps=10",), SPACE, trials, seed, prune)
    sweep = Sweep(name, spec, Target.load("local"), root, "val/acc", "max")
    sweep.folder.mkdir(parents=True, exist_ok=True)
    sweep.create_study()
    return sweep


def _stand_in(outcomes: dict[int, str] | None = None) -> Callable[[RecipeConfig, Run], int]:
    """A trial without training: its val/acc a smooth function of lr and dropout (best near lr 1e-2,
    dropout 0); `outcomes` gives some trials another ending (once each)."""
    left = dict(outcomes or {})

    def runner(recipe: RecipeConfig, run: Run) -> int:
        import math

        number = int(run.name.rsplit("-t", 1)[1])
        acc = 1.0 - (math.log10(recipe.optim.lr) + 2) ** 2 / 10 - recipe.model.dropout / 5
        outcome = left.pop(number, "completed")
        run.write_result(RunResult(outcome=outcome, step=10 if outcome == "completed" else 5,
                                   signal="SIGTERM" if outcome == "preempted" else None, metrics={"val/acc": acc}))
        return 0

    return runner


def _journal(root: Path, name: str) -> list:
    journal = root / "sweeps" / name / STUDY_JOURNAL
    return load_study(journal_storage(journal), name).get_trials(deepcopy=False)


# ----------------------------------------------------------------------------- the worker loop, stand-in trials
def test_same_seed_same_suggestions_also_across_a_restart(tmp_path: Path) -> None:
    straight = _sweep(tmp_path / "a", "s")
    assert work(straight, 0, _stand_in()) == 0
    params = [t.params for t in _journal(tmp_path / "a", "s")]
    assert len(params) == 8 and len({p["optim.lr"] for p in params}) == 8

    again = _sweep(tmp_path / "b", "s")
    assert work(again, 0, _stand_in()) == 0
    assert [t.params for t in _journal(tmp_path / "b", "s")] == params  # TPE's phase included (trials 3-7)

    # stopped by a signal at trial 4 (its ranks saved): the worker stops; started again, trial 4 resumes as
    # the same trial, and the suggestions after it are those of the uninterrupted sweep
    stopped = _sweep(tmp_path / "c", "s")
    assert work(stopped, 0, _stand_in({4: "preempted"})) == 1
    assert [t.state.name for t in _journal(tmp_path / "c", "s")] == ["COMPLETE"] * 4 + ["RUNNING"]
    assert work(_sweep(tmp_path / "c", "s"), 0, _stand_in()) == 0
    assert [t.params for t in _journal(tmp_path / "c", "s")] == params
    config = (tmp_path / "c" / "s-t04" / "config.yaml").read_text()
    assert f"lr: {params[4]['optim.lr']!r}" in config  # the run trains with the value the study holds

    other = _sweep(tmp_path / "d", "s", seed=1)
    assert work(other, 0, _stand_in()) == 0
    assert [t.params for t in _journal(tmp_path / "d", "s")] != params


def test_corners_are_written_as_the_study_suggests() -> None:
    """`uniform:0:1` on an int key passed as 0 and 1, then the study's 0.53 was refused once it existed."""
    space = [("trainer.seed", "uniform", ["0", "1"]), ("trainer.epochs", "randint", ["1_0", "12"]),
             ("optim.name", "choice", ["sgd", "adamw", "sgd"])]
    assert corners(space) == [("trainer.seed=0.0", "trainer.epochs=10", "optim.name=sgd"),
                              ("trainer.seed=1.0", "trainer.epochs=12", "optim.name=adamw"),
                              ("trainer.seed=1.0", "trainer.epochs=12", "optim.name=sgd")]


def test_outcomes_are_told_and_the_table_shows_best_pruned_importances(runs_dir: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    sweep = _sweep(runs_dir, "told", trials=6)
    record = {"name": "told", "recipe": "digits", "cluster": "local", "spec": sweep.spec.to_dict(),
              "best_metric": "val/acc", "best_mode": "max", "trials": [], "arrays": []}
    (runs_dir / "sweeps" / "told.json").write_text(json.dumps(record))
    assert work(sweep, 0, _stand_in({1: "pruned", 2: "failed"})) == 0
    trials = _journal(runs_dir, "told")
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    for t in trials:  # a completed trial is told its run's final metric
        result = read_result(runs_dir / trial_name("told", t.number, 6))
        assert t.user_attrs["run_name"] == f"told-t0{t.number}"
        if t.state.name == "COMPLETE":
            assert t.value == result["val/acc"]
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    capsys.readouterr()
    assert main(["sweep-status", "told", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert f"best trial: told-t0{best.number} (#{best.number}) val/acc {best.value:.4f}" in out
    assert "pruned: told-t01 at step ?" in out  # stand-in trials report nothing to the study
    assert re.search(r"parameter importances \([^)]*\): (\S+ \d\.\d\d, ){2}\S+ \d\.\d\d", out), out
    assert re.search(r"told-t01\s+pruned", out) and re.search(r"told-t02\s+failed", out), out


@pytest.mark.parametrize("name", ["../escaped", "/tmp", "a\nb", 7])
def test_a_run_name_read_back_from_the_journal_is_checked_as_at_launch(tmp_path: Path, name: object) -> None:
    """The journal is a file in the runs directory: a run_name edited into it must not become a path."""
    from launcher.sweeps.bayes.claims import claim

    sweep = _sweep(tmp_path / "runs", "j", trials=2)
    assert claim(sweep, 0) is not None  # trial 0, RUNNING, this worker's
    storage = sweep.storage()
    trial = load_study(storage, "j").get_trials(deepcopy=False)[0]
    storage.set_trial_user_attr(trial._trial_id, "run_name", name)
    with pytest.raises(UsageError, match="not a (valid )?name"):
        claim(sweep, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_importances_with_too_few_completed_trials(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = _sweep(runs_dir, "few", trials=1)
    (runs_dir / "sweeps" / "few.json").write_text(json.dumps(
        {"name": "few", "recipe": "digits", "cluster": "local", "spec": sweep.spec.to_dict(), "best_metric": "val/acc",
         "best_mode": "max", "trials": [], "arrays": []}))
    work(sweep, 0, _stand_in())
    capsys.readouterr()
    assert main(["sweep-status", "few", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "parameter importances: not yet (needs 2 completed trials, the study has 1)" in out
    assert "best trial: few-t00 (#0)" in out


# ----------------------------------------------------------------------------- rank 0's pruning rule
def _report(sweep: Sweep, curve: dict[int, float]) -> int | None:
    """A new trial of `sweep` whose rank 0 evaluates `curve` (step -> val/acc) in step order, through the
    reporter a real trial uses: the step its pruner stopped it at (the study told PRUNED), else None (told
    COMPLETE with its last value)."""
    import optuna

    study = load_study(sweep.storage(), sweep.name)
    trial = study.ask(distributions(sweep.spec.space()))
    for key, value in (("run_name", f"{sweep.name}-reported{trial.number}"), ("overrides", []), ("worker", 99)):
        trial.set_user_attr(key, value)
    reporter = TrialReporter(TrialTicket(str(sweep.journal), sweep.name, trial.number, "val/acc", sweep.spec.prune))
    for step, value in sorted(curve.items()):
        if reporter.on_evaluate(TrainState(step=step), {"val/acc": value, "val/loss": 1.0}):
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial.number, curve[max(curve)])
    return None


def test_asha_rungs_start_at_the_third_evaluation_and_keep_the_top_third(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, "asha", prune=True)
    every10 = lambda level: {s: level + s / 1000 for s in range(10, 101, 10)}  # noqa: E731
    assert _report(sweep, every10(0.5)) is None  # the first trial is the best at each rung: it completes
    # far worse, but the first two evaluations are never judged; the 3rd (step 30) is the first rung
    assert _report(sweep, {10: 0.0, 20: 0.0, **{s: 0.1 for s in range(30, 101, 10)}}) == 30
    assert _report(sweep, every10(0.6)) is None  # the best at both rungs (steps 30 and 90)
    assert _report(sweep, {**every10(0.7), 90: 0.55}) == 90  # the second rung: 3 x 30, below both before it
    # at the first rung so far 0.73, 0.63, 0.53, 0.1: a trial goes on only while in the top third of the
    # trials at the rung, itself included (the best one of up to 5, the best 2 of 6 to 8)
    assert _report(sweep, every10(0.2)) == 30  # 0.23: 5th of 5
    assert _report(sweep, every10(0.3)) == 30  # 0.33: 4th of 6
    assert _report(sweep, {**every10(0.62), 90: 0.9}) is None  # 0.65: 2nd of 7, then the best at step 90
    assert _report(sweep, every10(0.61)) == 30  # 0.64: 3rd of 8

    other = _sweep(tmp_path, "every5", prune=True)  # the rungs follow the run's own evaluations
    assert _report(other, {s: 0.5 for s in range(5, 41, 5)}) is None
    assert _report(other, {s: 0.4 for s in range(5, 41, 5)}) == 15

    off = _sweep(tmp_path, "off", prune=False)  # without --prune every trial reports and completes
    assert _report(off, every10(0.5)) is None and _report(off, every10(0.1)) is None
    assert [sorted(t.intermediate_values) for t in _journal(tmp_path, "off")] == [list(range(10, 101, 10))] * 2


# ----------------------------------------------------------------------------- refusals through the CLI
@pytest.mark.parametrize("args,message", [
    (["--grid", "optim.lr=0.1,0.2", "--prune"], "--prune goes with --search bayes"),
    (["--random", "optim.lr=uniform:0.1:0.2", "--trials", "2", "--param", "model.dropout=uniform:0:0.5"],
     "--param model.dropout=uniform:0:0.5 goes with --search bayes"),
    (["--search", "bayes", "--param", "optim.lr=normal:0:1", "--trials", "2"],
     "--param 'optim.lr=normal:0:1': unknown distribution 'normal'"),
    (["--search", "bayes", "--param", "optim.lr=loguniform:0:0.1", "--trials", "2"], "loguniform bounds must be > 0"),
    (["--search", "bayes", "--param", "optim.lr=uniform:0.1", "--trials", "2"], "two float bounds"),
    (["--search", "bayes", "--param", "optim.lr=loguniform:1e-4:1e-1"], "--search bayes needs --trials N"),
    (["--search", "bayes", "--trials", "2"], "needs at least one --param"),
    (["--search", "bayes", "--param", "optim.lr=uniform:0.1:0.2", "--param", "optim.lr=uniform:0.1:0.3",
      "--trials", "2"], "--param optim.lr given more than once"),
    (["--search", "bayes", "--param", "optim.lr=uniform:0.1:0.2", "--grid", "model.dropout=0,0.1", "--trials", "2"],
     "--grid belongs to grid and random sweeps"),
    (["--search", "bayes", "--param", "optim.lrr=loguniform:1e-4:1e-1", "--trials", "2"], "optim.lrr: unknown key"),
    (["--search", "bayes", "--param", "model.dropout=uniform:0:1.5", "--trials", "2"],
     "model.dropout: 1.5 must be between 0 and 1"),
    (["--search", "bayes", "--param", "optim.lr=uniform:0.1:0.2", "--trials", "0"], "--trials 0 must be >= 1"),
    (["--search", "bayes", "--param", "trainer.micro_batch=choice:16,32\n", "--trials", "2"],
     "control character '\\n' in the value"),  # accepted, and ran trials (issue 23)
    (["--search", "bayes", "--param", "optim.lr=uniform:0.1:0.2", "--trials", "2", "--workers", "0"],
     "--workers 0 must be >= 1"),
])
def test_bad_bayes_input_is_one_line_exit_2_nothing_created(args: list[str], message: str, runs_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "digits", *args, "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err, err
    assert list(runs_dir.iterdir()) == []


# ----------------------------------------------------------------------------- tier 2: real digits trials
@pytest.mark.slow
def test_a_pruned_trial_stops_cleanly_on_every_rank(runs_dir: Path) -> None:
    """Three earlier trials that reported val/acc 1.0 at every step: ASHA must stop the next one at its
    first rung, its third evaluation, on both ranks, with outcome pruned, and the study must hear PRUNED."""
    params = ("optim.lr=loguniform:1e-3:1e-1", "model.dropout=uniform:0:0.5")
    spec = BayesSpec("digits", (), params, 4, 0, True)
    sweep = Sweep("pr", spec, Target.load("local"), runs_dir, "val/acc", "max")
    sweep.folder.mkdir(parents=True)
    sweep.create_study()
    for _ in range(3):
        assert _report(sweep, {s: 1.0 for s in range(5, 45, 5)}) is None
    proc = run_cli("sweep", "digits", "--search", "bayes", *[a for p in params for a in ("--param", p)],
                   "--trials", "4", "--prune", "--name", "pr", "trainer.epochs=null", "trainer.max_steps=40",
                   "trainer.eval_every=5", runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs_dir / "pr-t03"
    result = read_result(run_dir)
    assert result["outcome"] == "pruned" and result["step"] == 15, result
    assert max_logged_step(run_dir) == 15  # nothing trained after the evaluation that pruned it
    for rank in (0, 1):  # both ranks ended the run, without an error
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank} of 2" in log and "Traceback" not in log and " ERROR " not in log, log
    assert "trial 3 of study pr pruned at step 15" in (run_dir / "logs" / "rank0.log").read_text()
    trial = _journal(runs_dir, "pr")[3]
    assert trial.state.name == "PRUNED" and sorted(trial.intermediate_values) == [5, 10, 15]
    assert trial.intermediate_values[15] == pytest.approx(result["val/acc"])
    assert "pruned: pr-t03 at step 15" in proc.stdout and re.search(r"pr-t03\s+pruned\s+15", proc.stdout), proc.stdout


@pytest.mark.slow
def test_a_killed_trial_resumes_as_the_same_trial_and_the_best_is_recorded(runs_dir: Path) -> None:
    args = ["sweep", "digits", "--search", "bayes", "--param", "optim.lr=loguniform:1e-2:1e-1", "--trials", "2",
            "--name", "kill", "parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=400",
            "trainer.eval_every=50", "checkpoint.every_steps=50", "--runs-dir", str(runs_dir)]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: 100 in committed_steps(runs_dir / "kill-t00" / "checkpoints"),
                   "trial 0 to commit its step-100 checkpoint", timeout=120, poll=0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the launcher, its worker loop and the rank: no one tells anything
        first.wait()
    (before,) = _journal(runs_dir, "kill")
    assert before.state.name == "RUNNING" and not (runs_dir / "kill-t00" / "result.json").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"trial kill-t00 \(#0, resumed, worker 0\): optim.lr=", again.stdout), again.stdout
    assert "resumed from" in (runs_dir / "kill-t00" / "logs" / "rank0.log").read_text()
    trials = _journal(runs_dir, "kill")
    assert [t.number for t in trials] == [0, 1] and trials[0].params == before.params  # same trial, same params
    values = {}
    for t in trials:
        result = read_result(runs_dir / f"kill-t0{t.number}")
        assert t.state.name == "COMPLETE" and result["outcome"] == "completed" and result["step"] == 400
        assert t.value == result["val/acc"]
        values[t.number] = t.value
    best = max(values, key=values.get)
    record = json.loads((runs_dir / "sweeps" / "kill.json").read_text())
    assert record["best"]["number"] == best and record["best"]["run_name"] == f"kill-t0{best}"
    assert record["best"]["value"] == values[best]
    assert f"best trial: kill-t0{best} (#{best})" in again.stdout


@pytest.mark.slurm
def test_slurm_workers_are_one_job_array_drawing_from_the_study(runs_dir: Path, slurm: None) -> None:
    proc = run_cli("sweep", "digits", "--search", "bayes", "--param", "optim.lr=loguniform:1e-2:1e-1", "--trials", "3",
                   "--workers", "2", "--prune", "--cluster", "local_slurm", "--wait", "trainer.epochs=null",
                   "trainer.max_steps=10", "trainer.eval_every=5", "--name", "slb", runs_dir=runs_dir, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"submitted Slurm job array (\d+) \(2 workers\)", proc.stdout).group(1)
    assert json.loads((runs_dir / "sweeps" / "slb.json").read_text())["arrays"] == [array]
    trials = _journal(runs_dir, "slb")
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both elements drew trials
    for t in trials:
        run_dir = runs_dir / f"slb-t0{t.number}"
        info = json.loads((run_dir / "run.json").read_text())
        assert info["job_id"] == f"{array}_{t.user_attrs['worker']}" and info["backend"] == "slurm"
        result = read_result(run_dir)
        assert result["outcome"] == "completed" and result["step"] == 10 and t.value == result["val/acc"]
        assert "rank 1 of 2" in (run_dir / "logs" / "rank1.log").read_text()  # srun started both ranks
    assert "study slb: 3 of 3 trials: 3 completed" in proc.stdout
