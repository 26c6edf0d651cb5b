"""A worker's loop: claim a trial (its own unfinished one first, else a new one while the budget lasts),
run it, tell the study how it ended. `Sweep` is the sweep as a worker sees it."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from launcher.backends.base import SweepWorkers, workers as sweep_workers
from launcher.preflight import Target
from launcher.runs import prepare_run, run_at
from launcher.sweeps.bayes.spec import BayesSpec, distributions, override_text, trial_name
from launcher.sweeps.record import sweeps_dir
from launcher.sweeps.space import shown
from jobs.schema import RecipeConfig
from jobs.schema.errors import UsageError
from jobs.schema.run_dir import ENDED_BY_STOP, Run
from jobs.schema.study import STUDY_JOURNAL, TrialTicket, journal_storage, load_study

if TYPE_CHECKING:
    import optuna

# Runs one trial's ranks where the worker runs and returns their exit code: the backend's
# `run_trial_here` (local: torchrun on this machine; Slurm: srun inside the worker's allocation).
Runner = Callable[[RecipeConfig, Run], int]
WORKER_JSON = "worker.json"  # the spec as given (secrets unmasked, mode 0600): what Slurm workers read


@dataclass(frozen=True)
class Sweep:
    """A Bayesian sweep as a worker sees it: the spec, where its runs and study live, its config."""

    name: str
    spec: BayesSpec
    target: Target
    root: Path  # the runs directory
    metric: str
    mode: str  # "max" or "min"
    study: str = ""  # the study's URI where the backend keeps it in an object store (VMs); "": the journal file

    @property
    def folder(self) -> Path:
        return sweeps_dir(self.root) / self.name

    @property
    def journal(self) -> str:
        """Where the study lives: its journal file in the sweep's folder, or its object store URI."""
        return self.study or str(self.folder / STUDY_JOURNAL)

    def storage(self) -> "optuna.storages.BaseStorage":
        return journal_storage(self.journal, self.target.cluster.storage)

    def run_id(self, number: int) -> Optional[str]:
        """A trial's run id where its run directory may be lost with a machine (a study in an object store): the
        same for every start of the trial, so a new directory resumes the checkpoints its earlier starts made."""
        if not self.study:
            return None
        return hashlib.sha256(f"{self.study}#{number}".encode()).hexdigest()[:12]

    def recipe(self, overrides: tuple[str, ...]) -> RecipeConfig:
        return self.target.recipe(self.spec.recipe, [*self.spec.fixed, *overrides])

    def run_here(self, recipe: RecipeConfig, run: Run) -> int:
        """The default Runner: the backend's `run_trial_here` (local: torchrun; Slurm: srun in the allocation)."""
        return workers_of(self.target).run_trial_here(recipe, self.target.cluster, run)

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
                run = _trial_run(sweep, trial.user_attrs.get("run_name"))
                if tell(study, trial.number, run, sweep.metric) in ("", *ENDED_BY_STOP):
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


def _trial_run(sweep: Sweep, name: object) -> Run:
    """The run of a trial the journal names: checked as a launch checks a run name (the journal is a file
    anyone with the runs directory can edit, and `../x` or `/etc` must not become a run directory)."""
    if not isinstance(name, str):
        raise UsageError(f"{sweep.journal}: a trial's run_name is {name!r:.40}, not a name",
                         hint="the study journal is damaged: start the sweep again under another --name")
    return run_at(sweep.root, name)


def tell(study: "optuna.Study", number: int, run: Run, metric: str, code: Optional[int] = None) -> str:
    """Tell the study how trial `number`'s run ended; what it was ("" while it has no result and
    `code` is None: it never ended, so it resumes). A trial stopped by a signal (preempted, cancelled) is
    not told: it resumes. Any rank that failed (a signal, a non-zero code) fails it: the launcher settled
    result.json so (`jobs.script.settle`)."""
    from optuna.trial import TrialState

    result = run.result()
    outcome = result.outcome
    if outcome in ENDED_BY_STOP or (not outcome and code is None):
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
    run = prepare_run(recipe, sweep.target.cluster, name, sweep.root, "auto", run_id=sweep.run_id(claimed.number))
    TrialTicket(sweep.journal, sweep.name, claimed.number, sweep.metric, sweep.spec.prune).write(run.dir)
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
        if run_claimed(sweep, claimed, worker, runner) in ENDED_BY_STOP:
            print(f"trial #{claimed.number} was stopped by a signal; worker {worker} stops (the same "
                  f"command resumes it as the same trial)", file=sys.stderr, flush=True)
            return 1


def workers_of(target: Target) -> SweepWorkers:
    found = sweep_workers(target.backend)
    assert found is not None, "check_sweep() refused this backend before anything started"
    return found
