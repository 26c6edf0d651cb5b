"""The results table of a sweep: every trial's state and metric, best first."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher import backends
from launcher.plot import read_curves
from jobs.schema.errors import UsageError
from jobs.schema.run_dir import Run


def trial_state(run: Run) -> str:
    """`launcher status`'s state of a trial (its backend's view; Slurm also knows array elements that
    never started); "not started" before it has a run directory."""
    if not run.info_path.exists():
        return "not started"
    return backends.status(run).get("state", "unknown")


def _latest_logged(run: Run, metric: str) -> tuple[Optional[int], Optional[float]]:
    """The value of `metric` at the highest step logged in metrics.jsonl, for trials without a result yet (a
    resumed run logs some steps twice: the value it kept, as `launcher plot` draws it)."""
    try:
        points = read_curves(run.dir).get(metric)
    except UsageError:  # nothing logged yet
        return None, None
    return points[-1] if points else (None, None)


def trial_rows(root: Path, record: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    rows = []
    for entry in record["trials"]:
        run = Run.at(root / entry["run_name"])
        state = entry.get("state") or trial_state(run)  # a Bayesian sweep's study knows how its trials ended
        result = run.result()
        final = metric in result.metrics
        step, value = (result.step, result.metrics[metric]) if final else _latest_logged(run, metric)
        if value is None and entry.get("value") is not None and entry.get("value_of") == metric:  # the study's: the run directory is elsewhere (VMs)
            step, value, final = entry.get("step"), entry["value"], True
        rows.append({"run": run.name, "overrides": list(entry["overrides"]), "state": state,
                     "step": step if step is not None else result.step, "metric": value, "final": final})
    return rows


def sort_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first; trials without the metric last, in trial order (`sorted` is stable)."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r["metric"] is None, sign * r["metric"] if r["metric"] is not None else 0.0))


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    header = ["trial", "state", "step", metric, "overrides"]
    cells = [[r["run"], r["state"], "-" if r["step"] is None else str(r["step"]),
              "-" if r["metric"] is None else f"{r['metric']:.4f}{'' if r['final'] else '*'}", " ".join(r["overrides"])]
             for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *cells]]
    if any(r["metric"] is not None and not r["final"] for r in rows):
        lines.append("* latest logged value: the trial has not finished")
    return "\n".join(lines)


def print_table(root: Path, record: dict[str, Any], metric: str, mode: str) -> None:
    rows = sort_rows(trial_rows(root, record, metric), mode)
    print(f"sweep {record['name']}: {len(rows)} trials of {record['recipe']} on {record['cluster']}, "
          f"by {metric} ({mode}), best first")
    print(format_table(rows, metric), flush=True)
