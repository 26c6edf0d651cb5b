"""Bayesian sweeps: Optuna's seeded TPE over `--param` distributions, trials pruned by the median rule.

    launcher sweep digits --search bayes --param optim.lr=loguniform:1e-4:1e-1 --trials 20 --prune

The study is a journal file, `<runs_dir>/sweeps/<sweep>/study.journal` (`schema.study`): appends under a
lock file, so every worker on every node that shares the file system uses it, with no database server.
A trial is an ordinary run `<sweep>-tNN`, NN its Optuna trial number; its run directory holds the
trial's overrides (config.yaml) and trial.json, through which rank 0 reports each evaluation.

A worker loops: claim a trial, run it, tell the study how it ended, until the budget (`--trials`, every
trial the study holds) is spent. Claiming takes the worker's own unfinished trial first (one that was
preempted or killed mid-run resumes as the same trial, from its checkpoints), else asks for a new one.
Locally `launcher sweep` is the one worker, trials one after another; on Slurm every element of a job
array is a worker (`launcher.sweeps.worker`), `--workers` of them.

Seeded: trial n of worker w is sampled by a TPESampler seeded with (seed, w, n), and TPE's draw depends
only on that and the study's history, so one worker suggests the same sequence for the same seed, even
when the sweep was stopped and started again in between (one sampler for the whole sweep would restart
its random stream at every start).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from launcher.backends.base import SweepWorkers, workers as sweep_workers
from launcher.preflight import Target
from launcher.runs import prepare_run
from launcher.sweeps.record import record_path, sweeps_dir, write_record
from launcher.sweeps.space import parse_random, shown
from schema import RecipeConfig
from schema.errors import UsageError
from schema.names import check_name
from schema.run_dir import Run
from schema.study import STUDY_JOURNAL, TrialTicket, journal_storage, load_study

if TYPE_CHECKING:
    import optuna

# Runs one trial's ranks where the worker runs and returns their exit code: the backend's
# `run_trial_here` (local: torchrun on this machine; Slurm: srun inside the worker's allocation).
Runner = Callable[[RecipeConfig, Run], int]
WORKER_JSON = "worker.json"  # the spec as given (secrets unmasked, mode 0600): what Slurm workers read


@dataclass(frozen=True)
class BayesSpec:
    """What the user asked for; its hash names the sweep."""

    recipe: str  # recipe name or path, as given
    fixed: tuple[str, ...]  # overrides shared by every trial
    params: tuple[str, ...]  # `key=distribution:args`, as --random takes them
    trials: int  # the budget: trials the study may hold, whatever their outcome
    seed: int  # seeds TPE
    prune: bool  # the median rule may stop trials after an evaluation

    def to_dict(self) -> dict[str, Any]:
        """As stored in the sweep record: credentials inside override values are masked."""
        return {"search": "bayes", "recipe": self.recipe, "fixed": shown(self.fixed), "params": shown(self.params),
                "trials": self.trials, "seed": self.seed, "prune": self.prune}

    def raw(self) -> dict[str, Any]:
        """worker.json: as given, for the workers that build trials on the nodes."""
        return {"recipe": self.recipe, "fixed": list(self.fixed), "params": list(self.params),
                "trials": self.trials, "seed": self.seed, "prune": self.prune}

    @classmethod
    def from_raw(cls, data: dict[str, Any]) -> "BayesSpec":
        return cls(data["recipe"], tuple(data["fixed"]), tuple(data["params"]), data["trials"], data["seed"],
                   data["prune"])

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

    def space(self) -> list[tuple[str, str, list[str]]]:
        """The parsed --param items, checked (the same distributions and errors as --random)."""
        if not self.params:
            raise UsageError("--search bayes needs at least one --param KEY=DIST:ARGS",
                             hint="e.g. --param optim.lr=loguniform:1e-4:1e-1")
        parsed = parse_random(list(self.params), "--param")
        keys = [key for key, _, _ in parsed]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise UsageError(f"--param {', '.join(repeated)} given more than once; give each key once")
        if self.trials < 1:
            raise UsageError(f"--trials {self.trials} must be >= 1 (the number of trials the study may run)")
        return parsed


def default_name(spec: BayesSpec) -> str:
    return f"{Path(spec.recipe).stem}-bayes-{spec.digest()}"


def trial_name(sweep: str, number: int, budget: int) -> str:
    return f"{sweep}-t{number:0{max(2, len(str(budget - 1)))}d}"


def distributions(space: list[tuple[str, str, list[str]]]) -> dict[str, "optuna.distributions.BaseDistribution"]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, dist, args in space:
        if dist == "choice":
            out[key] = CategoricalDistribution(args)  # the override texts: parsed as YAML like any override
        elif dist == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        else:
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=dist == "loguniform")
    return out


def override_text(value: Any) -> str:
    """A suggested value as override text; a float keeps every digit, so the run trains with exactly
    the value the study holds."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def corners(space: list[tuple[str, str, list[str]]]) -> list[tuple[str, ...]]:
    """Override sets that reach every bound and every choice: if each loads, every suggestion will."""
    def at(i: int) -> tuple[str, ...]:
        return tuple(f"{k}={args[min(i, len(args) - 1)]}" for k, _, args in space)

    return [at(i) for i in range(max(len(args) for _, _, args in space))]


# ----------------------------------------------------------------------------- the study and its trials
@dataclass(frozen=True)
class Sweep:
    """A Bayesian sweep as a worker sees it: the spec, where its runs and study live, its config."""

    name: str
    spec: BayesSpec
    target: Target
    root: Path  # the runs directory
    metric: str
    mode: str  # "max" or "min"

    @property
    def folder(self) -> Path:
        return sweeps_dir(self.root) / self.name

    @property
    def journal(self) -> Path:
        return self.folder / STUDY_JOURNAL

    def storage(self) -> "optuna.storages.BaseStorage":
        return journal_storage(self.journal)

    def recipe(self, overrides: tuple[str, ...]) -> RecipeConfig:
        return self.target.recipe(self.spec.recipe, [*self.spec.fixed, *overrides])

    def run_here(self, recipe: RecipeConfig, run: Run) -> int:
        """The default Runner: the backend's `run_trial_here` (local: torchrun; Slurm: srun in the allocation)."""
        return _workers(self.target).run_trial_here(recipe, self.target.cluster, run)

    def create_study(self) -> None:
        import optuna

        optuna.create_study(study_name=self.name, storage=self.storage(), load_if_exists=True,
                            direction="maximize" if self.mode == "max" else "minimize")


@dataclass(frozen=True)
class Claimed:
    number: int
    overrides: tuple[str, ...]
    resumed: bool


def sampler_for(seed: int, worker: int, number: int, budget: int) -> "optuna.samplers.TPESampler":
    """TPE for trial `number` of `worker` (see the module doc). Its random start-up phase is a quarter of
    the budget (3 to 10 trials; Optuna's default is 10): a sweep of 20 trials then models 15 of them."""
    import numpy as np
    import optuna

    state = int(np.random.SeedSequence([seed, worker, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=state, n_startup_trials=max(3, min(10, budget // 4)))


class ClaimLock:
    """One claimer at a time per sweep (counting the budget and asking must be one step): Optuna's own
    lock file, which works on NFS."""

    def __init__(self, folder: Path) -> None:
        from optuna.storages.journal import JournalFileOpenLock

        self.lock = JournalFileOpenLock(str(folder / "claim"))

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def claim(sweep: Sweep, worker: int) -> Optional[Claimed]:
    """This worker's unfinished trial (the lowest number), else a new one while the budget lasts."""
    from optuna.trial import TrialState

    storage = sweep.storage()
    with ClaimLock(sweep.folder):
        study = load_study(storage, sweep.name)
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == TrialState.RUNNING and trial.user_attrs.get("worker") == worker:
                run = Run(trial.user_attrs["run_name"], sweep.root / trial.user_attrs["run_name"])
                if tell(study, trial.number, run, sweep.metric) in ("", "preempted"):
                    return Claimed(trial.number, tuple(trial.user_attrs["overrides"]), resumed=True)
        if len(trials) >= sweep.spec.trials:
            return None
        study.sampler = sampler_for(sweep.spec.seed, worker, len(trials), sweep.spec.trials)
        trial = study.ask(distributions(sweep.spec.space()))
        overrides = [f"{k}={override_text(trial.params[k])}" for k, _, _ in sweep.spec.space()]
        for key, value in (("run_name", trial_name(sweep.name, trial.number, sweep.spec.trials)),
                           ("overrides", overrides), ("worker", worker)):
            trial.set_user_attr(key, value)
        return Claimed(trial.number, tuple(overrides), resumed=False)


def tell(study: "optuna.Study", number: int, run: Run, metric: str, code: Optional[int] = None) -> str:
    """Tell the study how trial `number`'s run ended; what it was ("" while it has no result and
    `code` is None: it never ended, so it resumes). A preempted trial is not told: it resumes."""
    from optuna.trial import TrialState

    result = run.result()
    outcome = result.outcome
    if outcome == "preempted" or (not outcome and code is None):
        return outcome
    if outcome == "completed" and metric in result.metrics:
        study.tell(number, result.metrics[metric])
    elif outcome == "pruned":
        study.tell(number, state=TrialState.PRUNED)  # Optuna keeps the last reported value with it
    else:
        outcome = "failed"  # a crash, or a run that never measured the metric
        study.tell(number, state=TrialState.FAIL)
    return outcome


def run_claimed(sweep: Sweep, claimed: Claimed, worker: int, runner: Runner) -> str:
    """Prepare the trial's run directory (resumed when it exists), run it, tell the study."""
    name = trial_name(sweep.name, claimed.number, sweep.spec.trials)
    storage = sweep.storage()
    how = "resumed" if claimed.resumed else "new"
    print(f"trial {name} (#{claimed.number}, {how}, worker {worker}): {' '.join(shown(claimed.overrides))}",
          flush=True)
    recipe = sweep.recipe(claimed.overrides)
    run = prepare_run(recipe, sweep.target.cluster, name, sweep.root, "auto")
    TrialTicket(str(sweep.journal), sweep.name, claimed.number, sweep.metric, sweep.spec.prune).write(run.dir)
    code = runner(recipe, run)
    outcome = tell(load_study(storage, sweep.name), claimed.number, run, sweep.metric, code)
    result = run.result()
    value = result.metrics.get(sweep.metric)
    shown_value = f"{sweep.metric} {value:.4f}" if value is not None else f"exit code {code}"
    print(f"trial {name}: {outcome} at step {result.step}, {shown_value}", flush=True)
    return outcome


def work(sweep: Sweep, worker: int, runner: Runner) -> int:
    """Claim, run and tell until the budget is spent; 0, or 1 when a trial was stopped by a signal
    (its ranks saved: the same command, or the requeued job, resumes it as the same trial)."""
    while True:
        claimed = claim(sweep, worker)
        if claimed is None:
            return 0
        if run_claimed(sweep, claimed, worker, runner) == "preempted":
            print(f"trial #{claimed.number} was stopped by a signal; worker {worker} stops (the same "
                  f"command resumes it as the same trial)", file=sys.stderr, flush=True)
            return 1


# ----------------------------------------------------------------------------- `launcher sweep --search bayes`
def check_sweep(spec: BayesSpec, name: str, target: Target) -> RecipeConfig:
    """Everything a trial can get wrong, before anything exists: names, each bound and choice, the backend."""
    space = spec.space()
    check_name("trial run name (a shorter --name makes it fit)", trial_name(name, spec.trials - 1, spec.trials))
    recipes = []
    for overrides in corners(space):
        try:
            recipes.append(target.recipe(spec.recipe, [*spec.fixed, *overrides]))
        except UsageError as err:
            raise UsageError(f"--param {' '.join(overrides)} (the bounds of the search space) is invalid, so "
                             f"nothing was created or submitted: {str(err).splitlines()[0]}", hint=err.hint) from None
    if sweep_workers(target.backend) is None:
        raise UsageError(f"cluster config {target.cluster.name!r} uses backend {target.cluster.backend!r}, which "
                         "does not run Bayesian sweeps", hint="use a local or Slurm cluster config (--cluster)")
    return recipes[0]


def new_record(spec: BayesSpec, name: str, target: Target, recipe: RecipeConfig, root: Path,
               workers: int) -> dict[str, Any]:
    """The sweep record (the same spec again finds the same sweep; another spec under its name is refused)."""
    path = record_path(root, name)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("spec") != spec.to_dict():
            raise UsageError(f"sweep {name!r} already exists with another spec ({path})",
                             hint="choose another --name, or leave --name out to name the sweep by its spec")
        record.update(cluster=target.cluster.name, workers=workers)
        return record
    return {"name": name, "recipe": recipe.name, "cluster": target.cluster.name, "spec": spec.to_dict(),
            "best_metric": recipe.checkpoint.best_metric or "val/acc", "best_mode": recipe.checkpoint.best_mode,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "launches": 0, "arrays": [], "workers": workers,
            "trials": []}


def run_bayes(spec: BayesSpec, name: str, target_given: str, runs_dir: Optional[str], workers: int,
              wait: bool) -> int:
    """`launcher sweep --search bayes`: checked, then the study created and its workers started."""
    target = Target.load(target_given)
    recipe = check_sweep(spec, name, target)
    root = target.runs_root(runs_dir)
    record = new_record(spec, name, target, recipe, root, workers)
    sweep = Sweep(name, spec, target, root, record["best_metric"], record["best_mode"])
    refuse_if_live(sweep, record)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    sweep.create_study()
    worker_json = sweep.folder / WORKER_JSON
    worker_json.touch(mode=0o600)
    worker_json.write_text(json.dumps({"spec": spec.raw(), "cluster": target_given, "cwd": os.getcwd(),
                                       "metric": sweep.metric, "mode": sweep.mode}, indent=2) + "\n")
    record["launches"] += 1
    write_record(root, name, record)
    print(f"sweep {name}: Bayesian (TPE, seed {spec.seed}{', median pruning' if spec.prune else ''}) over "
          f"{', '.join(k for k, _, _ in spec.space())}, {spec.trials} trials of {recipe.name} "
          f"({target.cluster.backend} backend, {workers} worker{'s' if workers > 1 else ''}); "
          f"study {sweep.journal}", flush=True)
    launched = _workers(target).launch_workers(recipe, target.cluster, sweep.folder, name, record["launches"], workers,
                              lambda index: work(sweep, index, sweep.run_here))
    if launched.batch_id:
        record["arrays"].append(launched.batch_id)
        write_record(root, name, record)
        print(f"table: launcher sweep-status {name}", flush=True)
    code = launched.code
    if wait and not launched.ended:
        code = target.backend.wait_workers(launched.batch_id)
    if wait or launched.ended:
        summary = summarize(sweep.root, record)
        record["best"] = summary.get("best")
        write_record(root, name, record)
        print_status(root, record, summary)
    return code


def refuse_if_live(sweep: Sweep, record: dict[str, Any]) -> None:
    """A sweep whose workers still run (Slurm arrays of an earlier launch) must not get a second set."""
    live = getattr(sweep.target.backend, "workers_live", None)
    arrays = record.get("arrays", [])
    if live and arrays and live(arrays[-1]):
        raise UsageError(f"sweep {sweep.name} still has workers queued or running (job array {arrays[-1]})",
                         hint=f"wait for them (launcher sweep-status {sweep.name}) or cancel them (scancel "
                              f"{arrays[-1]})")


# ----------------------------------------------------------------------------- `launcher sweep-status`
def is_bayes(record: dict[str, Any]) -> bool:
    return record.get("spec", {}).get("search") == "bayes"


def summarize(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record's view of the study: its trials (for the table), the best, the pruned, importances."""
    import optuna
    from optuna.trial import TrialState

    journal = sweeps_dir(root) / record["name"] / STUDY_JOURNAL
    if not journal.exists():
        return {"trials": [], "best": None, "pruned": [], "importances": None, "why_no_importances": "no study yet"}
    study = load_study(journal_storage(journal), record["name"])
    trials = study.get_trials(deepcopy=False)
    rows = [{"run_name": t.user_attrs.get("run_name", f"#{t.number}"), "overrides": t.user_attrs.get("overrides", []),
             "number": t.number, "state": t.state.name.lower()} for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"run_name": b.user_attrs.get("run_name"), "number": b.number, "value": b.value,
                "overrides": b.user_attrs.get("overrides", [])}
    pruned = [{"run_name": t.user_attrs.get("run_name"), "number": t.number,
               "step": t.last_step if t.last_step is not None else "?"} for t in trials if t.state == TrialState.PRUNED]
    importances, why = None, ""
    if len(complete) < 2:
        why = f"needs 2 completed trials, the study has {len(complete)}"
    else:
        try:
            with warnings.catch_warnings():  # "importances will be equal" when few trials differ: shown as such
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as err:  # e.g. every completed trial has the same parameters
            why = str(err).splitlines()[0]
    return {"trials": rows, "best": best, "pruned": pruned, "importances": importances, "why_no_importances": why,
            "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}}


def table_record(record: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The record with its trials from the study, as the results table (`sweeps.table`) reads them."""
    told = {"complete": "completed", "pruned": "pruned", "fail": "failed"}
    return {**record, "trials": [{"run_name": r["run_name"], "overrides": r["overrides"], "state": told.get(r["state"])}
                                 for r in summary["trials"]]}


def print_status(root: Path, record: dict[str, Any], summary: dict[str, Any], metric: Optional[str] = None,
                 mode: Optional[str] = None) -> None:
    from launcher.sweeps.table import print_table

    metric, mode = metric or record["best_metric"], mode or record["best_mode"]
    print_table(root, table_record(record, summary), metric, mode)
    counts = summary.get("counts", {})
    print(f"study {record['name']}: {len(summary['trials'])} of {record['spec']['trials']} trials: "
          f"{counts.get('complete', 0)} completed, {counts.get('pruned', 0)} pruned, {counts.get('fail', 0)} failed, "
          f"{counts.get('running', 0)} running or to resume")
    best = summary["best"]
    if best:
        print(f"best trial: {best['run_name']} (#{best['number']}) {record['best_metric']} {best['value']:.4f}: "
              f"{' '.join(best['overrides'])}")
    else:
        print("best trial: none completed yet")
    if summary["pruned"]:
        print("pruned: " + ", ".join(f"{p['run_name']} at step {p['step']}" for p in summary["pruned"]))
    if summary["importances"]:
        print("parameter importances (Optuna's default, PED-ANOVA, over the completed trials): "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    else:
        print(f"parameter importances: not yet ({summary['why_no_importances']})")
    sys.stdout.flush()


def _workers(target: Target) -> SweepWorkers:
    found = sweep_workers(target.backend)
    assert found is not None, "check_sweep() refused this backend before anything started"
    return found
