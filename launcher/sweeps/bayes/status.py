"""`launcher sweep-status` of a Bayesian sweep: the study's trials as the results table reads them, the best
trial, the pruned ones and the parameter importances."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from launcher.sweeps.record import sweeps_dir
from launcher.sweeps.space import shown
from jobs.schema import StorageConfig
from jobs.schema.study import STUDY_JOURNAL, journal_storage, load_study


if TYPE_CHECKING:
    import optuna


def is_bayes(record: dict[str, Any]) -> bool:
    return record.get("spec", {}).get("search") == "bayes"


def summarize(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record's view of the study: its trials (for the table), the best, the pruned, importances."""
    import optuna
    from optuna.trial import TrialState

    study = _open(root, record)
    if study is None:
        return {"trials": [], "best": None, "pruned": [], "importances": None, "why_no_importances": "no study yet"}
    trials = study.get_trials(deepcopy=False)
    # value and step: for the table, where the trial's run directory is on another machine (VMs)
    rows = [{"run_name": t.user_attrs.get("run_name", f"#{t.number}"), "number": t.number,
             "overrides": shown(t.user_attrs.get("overrides", [])), "state": t.state.name.lower(),
             "value": t.value if t.state == TrialState.COMPLETE else None, "step": t.last_step} for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"run_name": b.user_attrs.get("run_name"), "number": b.number, "value": b.value,
                "overrides": shown(b.user_attrs.get("overrides", []))}  # the record and lines: masked
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


def _open(root: Path, record: dict[str, Any]) -> Optional["optuna.Study"]:
    """The sweep's study: in its object store (the record's `study` URI, with the store's settings), else the
    journal file in the sweep's folder; None where there is none yet."""
    if record.get("study"):
        try:
            return load_study(journal_storage(record["study"], StorageConfig(**record.get("study_storage", {}))),
                              record["name"])
        except KeyError:  # optuna: no study of that name there yet
            return None
    journal = sweeps_dir(root) / record["name"] / STUDY_JOURNAL
    return load_study(journal_storage(journal), record["name"]) if journal.exists() else None


def table_record(record: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The record with its trials from the study, as the results table (`sweeps.table`) reads them."""
    told = {"complete": "completed", "pruned": "pruned", "fail": "failed"}
    return {**record, "trials": [{"run_name": r["run_name"], "overrides": r["overrides"], "state": told.get(r["state"]),
                                  "value": r.get("value"), "step": r.get("step"), "value_of": record["best_metric"]}
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
