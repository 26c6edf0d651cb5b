"""Running a sweep: validate every trial, skip the ones done or still going, launch the rest as one
batch through the cluster config's backend, and (on request) wait for them. No backend is named
here: the backend decides whether a batch is a job array or a queue of runs on this machine.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from launcher.backends.base import LIVE_STATES, Backend, Batch, Launched, Planned
from launcher.preflight import Target
from jobs.schema.run_dir import Run
from launcher.runs import prepare_run
from launcher.sweeps.record import new_record, record_path, set_trial_job, sweeps_dir, write_record
from launcher.sweeps.space import SweepSpec, Trial, expand, shown
from launcher.sweeps.table import print_table, trial_state
from jobs.schema import RecipeConfig
from jobs.schema.errors import UsageError
from jobs.schema.names import check_name


def run_sweep(spec: SweepSpec, name: str, target_given: str, runs_dir: Optional[str], wait: bool,
              max_parallel: Optional[int]) -> int:
    """`launcher sweep`: every trial checked before anything exists, then the remaining ones launched."""
    trials = expand(spec, name)
    for trial in trials:  # `<sweep>-tNN` must itself be a valid run name (length)
        check_name("trial run name (a shorter --name makes it fit)", trial.name)
    target = Target.load(target_given)
    recipes = resolve_trials(spec, trials, target)  # all of them, before anything exists
    root = target.runs_root(runs_dir)
    record = new_record(spec, name, target.cluster, trials, recipes[0], root)
    todo = []
    for trial, recipe in zip(trials, recipes):
        why = _skip_reason(Run.at(root / trial.name))
        if why:
            print(f"trial {trial.name}: {why}; not started again", flush=True)
        else:
            todo.append((trial, recipe))
    record["launches"] += 1
    write_record(root, name, record)
    print(f"sweep {name}: {len(trials)} trials of {recipes[0].name} ({target.cluster.backend} backend), "
          f"{len(todo)} to run; record {record_path(root, name)}", flush=True)
    launched = _launch(todo, target, root, record, max_parallel)
    code = launched.code
    if code == 0 and wait and not launched.ended:
        code = wait_for_trials(target.backend, root, record)
    if wait or launched.ended:
        print_table(root, record, record["best_metric"], record["best_mode"])
    return code


def resolve_trials(spec: SweepSpec, trials: list[Trial], target: Target) -> list[RecipeConfig]:
    """Load and check every trial's config; the first bad one stops the sweep before anything exists."""
    recipes = []
    for trial in trials:
        try:
            recipes.append(target.recipe(spec.recipe, [*spec.fixed, *trial.overrides]))
        except UsageError as err:
            raise UsageError(f"trial {trial.name} ({' '.join(shown(trial.overrides))}) is invalid, so nothing was "
                             f"created or submitted: {str(err).splitlines()[0]}", hint=err.hint) from None
    target.backend.check_many([(t.name, r) for t, r in zip(trials, recipes)], target.cluster)
    return recipes


def _skip_reason(run: Run) -> Optional[str]:
    """Completed trials are kept; a trial still queued or running must not get a second job."""
    if not run.info_path.exists():
        return None
    state = trial_state(run)
    if state == "completed":
        return "already completed"
    if state in LIVE_STATES:
        return f"still {state}"
    return None


def _launch(todo: list[tuple[Trial, RecipeConfig]], target: Target, root: Path, record: dict[str, Any],
            max_parallel: Optional[int]) -> Launched:
    """The remaining trials as one batch; their job ids (if the backend has any) go into the record."""
    def planned(trial: Trial, recipe: RecipeConfig) -> Planned:
        return Planned(recipe, lambda: prepare_run(recipe, target.cluster, trial.name, root, "auto"))

    for trial, _ in todo:
        print(f"trial {trial.name}: {' '.join(shown(trial.overrides))}", flush=True)
    batch = Batch(record["name"], sweeps_dir(root) / record["name"], record["launches"], max_parallel)
    launched = target.backend.launch_many([planned(t, r) for t, r in todo], target.cluster, batch)
    for trial, _ in todo:
        set_trial_job(record, trial.name, Run.at(root / trial.name).info().job_id)
    if launched.batch_id:
        record["arrays"].append(launched.batch_id)
    write_record(root, record["name"], record)
    if todo and not launched.ended:
        print(f"table: launcher sweep-status {record['name']}", flush=True)
    return launched


def wait_for_trials(backend: Backend, root: Path, record: dict[str, Any]) -> int:
    """Block until every submitted trial stops for good (requeues included); 0 if all completed."""
    runs = [Run.at(root / e["run_name"]) for e in record["trials"] if e.get("job_id")]
    try:
        final = backend.wait(runs)
    except KeyboardInterrupt:  # only the waiting stops: the trials keep running on the cluster
        print(f"\nstopped waiting; the trials still queued or running go on "
              f"(launcher sweep-status {record['name']})", file=sys.stderr)
        return 130
    # Slurm's word alone is not enough: the job can complete while the trainer stopped early
    bad = {n: s for n, s in final.items()
           if s != "completed" or Run.at(root / n).result().outcome != "completed"}
    for run_name, state in bad.items():
        print(f"trial {run_name}: {state}; logs: launcher logs {run_name}", file=sys.stderr)
    return 1 if bad else 0
