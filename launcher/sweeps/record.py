"""The sweep record, `<runs_dir>/sweeps/<sweep>.json`: the spec, the trials and their job ids.

Written atomically (like run.json); only the process running `launcher sweep` writes it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from launcher.sweeps.space import SweepSpec, Trial, shown
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.errors import UsageError
from jobs.schema.names import check_name
from jobs.schema.run_files import load_record, replace_text


def sweeps_dir(root: Path) -> Path:
    return root / "sweeps"


def record_path(root: Path, name: str) -> Path:
    return sweeps_dir(root) / f"{name}.json"


def read_record(root: Path, name: str) -> dict[str, Any]:
    path = record_path(root, name)
    if not path.exists():
        known = sorted(p.stem for p in sweeps_dir(root).glob("*.json")) if sweeps_dir(root).exists() else []
        raise UsageError(f"{path}: no such sweep (sweeps in {sweeps_dir(root)}: {', '.join(known) or 'none'})")
    return _load(path)


def _load(path: Path) -> dict[str, Any]:
    """A sweep's record: a UsageError naming the file if it is damaged (not JSON, not an object, a FIFO)."""
    try:
        record = load_record(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable: {err}", hint="repair or move this file aside") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: unreadable: a JSON {type(record).__name__}, not an object",
                         hint="repair or move this file aside")
    _check_trials(path, record.get("trials", []))
    return record


def _check_trials(path: Path, trials: Any) -> None:
    """Every reader builds run folders from the trials' names: a damaged or planted name (`../x`, `/etc`)
    must never become a path, so each is checked as a launch checks a --run-name."""
    if not isinstance(trials, list):
        raise UsageError(f"{path}: unreadable: trials is a {type(trials).__name__}, not a list",
                         hint="repair or move this file aside")
    for i, entry in enumerate(trials):
        name = entry.get("run_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(entry.get("overrides", []), list):
            raise UsageError(f"{path}: unreadable: trial {i} has no run_name and overrides list",
                             hint="repair or move this file aside")
        try:
            check_name("run name", name)
        except UsageError as err:
            raise UsageError(f"{path}: trial {i}: {str(err).splitlines()[0]}",
                             hint="repair or move this file aside") from None


def write_record(root: Path, name: str, record: dict[str, Any]) -> None:
    path = record_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(record, indent=2) + "\n")  # atomic, like run.json


def existing_record(root: Path, name: str, spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record of sweep `name` when the same spec runs again (None for a new sweep); another spec under
    the same name is refused. Grid, random and Bayesian sweeps alike."""
    path = record_path(root, name)
    if not path.exists():
        return None
    record = _load(path)
    if record.get("spec") != spec:
        raise UsageError(f"sweep {name!r} already exists with another spec ({path})",
                         hint="choose another --name, or leave --name out to name the sweep by its spec")
    return record


def new_record(spec: SweepSpec, name: str, cluster: ClusterConfig, trials: list[Trial],
               recipe: RecipeConfig, root: Path) -> dict[str, Any]:
    """The existing record when the same sweep runs again; a different spec under the same name is refused."""
    record = existing_record(root, name, spec.to_dict())
    if record is not None:
        record["cluster"] = cluster.name
        return record
    return {"name": name, "recipe": recipe.name, "cluster": cluster.name, "spec": spec.to_dict(),
            "best_metric": recipe.checkpoint.best_metric or "val/acc", "best_mode": recipe.checkpoint.best_mode,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "launches": 0, "arrays": [],
            "trials": [{"run_name": t.name, "overrides": shown(t.overrides), "job_id": None} for t in trials]}


def set_trial_job(record: dict[str, Any], run_name: str, job_id: Optional[str]) -> None:
    for entry in record["trials"]:
        if entry["run_name"] == run_name:
            entry["job_id"] = job_id
