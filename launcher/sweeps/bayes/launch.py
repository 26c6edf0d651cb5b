"""`launcher sweep --search bayes`: every bound and choice checked before anything exists, the sweep record,
the study created, and the backend's workers started."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from launcher.backends.base import workers as sweep_workers
from launcher.preflight import Target
from launcher.sweeps.bayes.claims import WORKER_JSON, Sweep, work, workers_of
from launcher.sweeps.bayes.spec import BayesSpec, corners, trial_name
from launcher.sweeps.bayes.status import print_status, summarize
from launcher.sweeps.record import existing_record, write_record
from launcher.sweeps.space import shown
from jobs.schema import RecipeConfig
from jobs.schema.errors import UsageError
from jobs.schema.names import check_name
from jobs.schema.secrets import write_private


def check_sweep(spec: BayesSpec, name: str, target: Target, workers: int = 1) -> RecipeConfig:
    """Everything a trial can get wrong, before anything exists: names, the backend and its workers, each bound and
    choice."""
    space = spec.space()
    check_name("trial run name (a shorter --name makes it fit)", trial_name(name, spec.trials - 1, spec.trials))
    found = sweep_workers(target.backend)
    if found is None:
        raise UsageError(f"cluster config {target.cluster.name!r} uses backend {target.cluster.backend!r}, which "
                         "does not run Bayesian sweeps", hint="use a local, Slurm or VMs cluster config (--cluster)")
    try:
        base: Optional[RecipeConfig] = target.recipe(spec.recipe, list(spec.fixed), check_backend=False)
    except UsageError:
        base = None  # the corners below say what is wrong, naming the --param values
    if base is not None:  # the backend's own refusals first: they reach no host (the corners' checks do, on VMs)
        found.check_workers(base, target.cluster, workers)
    recipes = []
    for overrides in corners(space):
        try:
            recipes.append(target.recipe(spec.recipe, [*spec.fixed, *overrides]))
        except UsageError as err:
            raise UsageError(f"--param {' '.join(shown(overrides))} (the bounds of the search space) is invalid, so "
                             f"nothing was created or submitted: {str(err).splitlines()[0]}", hint=err.hint) from None
    return recipes[0]


def new_record(spec: BayesSpec, name: str, target: Target, recipe: RecipeConfig, root: Path,
               workers: int) -> dict[str, Any]:
    """The sweep record (the same spec again finds the same sweep; another spec under its name is refused)."""
    record = existing_record(root, name, spec.to_dict())
    if record is not None:
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
    recipe = check_sweep(spec, name, target, workers)
    root = target.runs_root(runs_dir)
    record = new_record(spec, name, target, recipe, root, workers)
    study = workers_of(target).study_uri(recipe, target.cluster, name)
    if study:  # sweep-status reads it from there, with the store's endpoint, region and profile (no credentials)
        record.update(study=study, study_storage=dataclasses.asdict(target.cluster.storage))
    sweep = Sweep(name, spec, target, root, record["best_metric"], record["best_mode"], study or "")
    refuse_if_live(sweep, record)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    sweep.create_study()
    given = {"spec": spec.raw(), "cluster": target_given, "cwd": os.getcwd(), "metric": sweep.metric,
             "mode": sweep.mode, "study": sweep.study}
    write_private(sweep.folder / WORKER_JSON, json.dumps(given, indent=2) + "\n")  # unmasked: 0600 whatever was there
    record["launches"] += 1
    write_record(root, name, record)
    print(f"sweep {name}: Bayesian (TPE, seed {spec.seed}{', ASHA pruning' if spec.prune else ''}) over "
          f"{', '.join(k for k, _, _ in spec.space())}, {spec.trials} trials of {recipe.name} "
          f"({target.cluster.backend} backend, {workers} worker{'s' if workers > 1 else ''}); "
          f"study {sweep.journal}", flush=True)
    launched = workers_of(target).launch_workers(recipe, target.cluster, sweep.folder, name, record["launches"], workers,
                              lambda index: work(sweep, index, sweep.run_here))
    if launched.batch_id:
        record["arrays"].append(launched.batch_id)
        write_record(root, name, record)
        print(f"table: launcher sweep-status {name}", flush=True)
    code = launched.code
    if wait and not launched.ended:
        code = workers_of(target).wait_workers(launched.batch_id)
    if wait or launched.ended:
        summary = summarize(sweep.root, record)
        record["best"] = summary.get("best")
        write_record(root, name, record)
        print_status(root, record, summary)
    return code


def refuse_if_live(sweep: Sweep, record: dict[str, Any]) -> None:
    """A sweep whose workers still run (Slurm arrays of an earlier launch) must not get a second set."""
    arrays = record.get("arrays", [])
    if arrays and workers_of(sweep.target).workers_live(arrays[-1]):
        raise UsageError(f"sweep {sweep.name} still has workers queued or running (job array {arrays[-1]})",
                         hint=f"wait for them (launcher sweep-status {sweep.name}) or cancel them (scancel "
                              f"{arrays[-1]})")
