"""`launcher plot`: training and validation curves of one or several runs, as an image file; and
`launcher sweep-status SWEEP --plot FILE`: a sweep's optimisation history and its metric against each
parameter.

The curves come from each run's metrics.jsonl (what the ranks log every `logging.log_every` steps
and at each evaluation). A run that was preempted and resumed logs the steps after its last
checkpoint twice; the later value is the one the run kept, so it is the one drawn.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from jobs.schema.errors import UsageError
from jobs.schema.run_dir import METRICS_JSONL
from jobs.schema.run_files import open_regular, parse_json

FORMATS = (".png", ".pdf", ".svg")
NOT_CURVES = {"step", "time", "epoch"}  # bookkeeping, not something one compares runs by
# what `launcher status` shows of the newest training log line that measured a rate (jobs.training.throughput)
RATES = ("tokens_per_s", "samples_per_s", "tflops_per_device", "mfu", "peak_mem_gb", "peak_rss_gb")
TAIL = 1 << 18  # the end of metrics.jsonl read for it: many log lines, whatever the file's length
Curve = list[tuple[int, float]]
MAX_LINE = 1 << 20  # one line of metrics.jsonl: a few hundred bytes when a rank writes it
MAX_STEP = 2**53  # a step a float axis can place exactly


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """metric -> [(step, value)] sorted by step, one value per step (the last one logged)."""
    path = run_dir / METRICS_JSONL
    if not path.exists():
        raise UsageError(f"{path}: no such file: the run has logged no step here yet (a run on VMs logs on its "
                         f"first VM)")
    by_metric: dict[str, dict[int, float]] = {}
    for row in _rows(path):
        step = row.get("step")
        if not isinstance(step, int) or abs(step) > MAX_STEP:
            continue
        for key, value in row.items():
            number = _number(value)
            if key not in NOT_CURVES and number is not None:
                by_metric.setdefault(key, {})[step] = number
    return {metric: sorted(points.items()) for metric, points in by_metric.items()}


def _rows(path: Path) -> Iterator[dict]:
    """Each line of metrics.jsonl that is a JSON object; a line cut short by a crash, garbled or absurdly
    long or deep is skipped. Only a regular file is read (a FIFO or /dev/zero would never end)."""
    try:
        f = open_regular(path)
    except OSError as err:
        raise UsageError(f"{path}: cannot be read: {err.strerror or err}") from None
    with f:
        while line := f.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                while line and not line.endswith(b"\n"):  # the rest of an over-long line
                    line = f.readline(MAX_LINE)
                continue
            if not line.lstrip().startswith(b"{"):  # not a row: skipped without a parse (millions of them)
                continue
            try:
                row = parse_json(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def latest_rates(run_dir: Path) -> Optional[str]:
    """The newest throughput in the run's metrics.jsonl, as `launcher status` shows it ("12,345 tok/s,
    0.0439 TFLOP/s per device, MFU 26.80%, peak RSS 0.35 GB (step 24)"); None if it has logged none (or
    cannot be read). Only the end of the file is read."""
    try:
        with open_regular(run_dir / METRICS_JSONL) as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL))
            lines = f.read(TAIL).splitlines()[1 if size > TAIL else 0:]  # the first may be cut
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = parse_json(line) if line.lstrip().startswith(b"{") else None
        except ValueError:
            continue
        if isinstance(row, dict) and _number(row.get("samples_per_s")) is not None:
            values = {key: number for key in RATES if (number := _number(row.get(key))) is not None}
            return _rates_line(values, row.get("step"))
    return None


def _rates_line(values: dict[str, float], step: Any) -> str:
    parts = [f"{values['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in values
             else f"{values['samples_per_s']:,.1f} samples/s"]
    if "tflops_per_device" in values:
        parts.append(f"{values['tflops_per_device']:.3g} TFLOP/s per device")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.2f}%")
    parts += [f"{name} {values[key]:.2f} GB" for key, name in (("peak_mem_gb", "peak memory"),
                                                                  ("peak_rss_gb", "peak RSS")) if key in values]
    return ", ".join(parts) + (f" (step {step})" if isinstance(step, int) else "")


def _number(value: Any) -> Optional[float]:
    """A finite float from a logged value, or None (text, null, nan, an integer too large for a float)."""
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def default_metrics(curves: Iterable[dict[str, Curve]]) -> list[str]:
    """train/loss and val/loss side by side, then every other val/ metric any of the runs has."""
    found = sorted({metric for run in curves for metric in run})
    first = [m for m in ("train/loss", "val/loss") if m in found]
    return first + [m for m in found if m.startswith("val/") and m not in first]


def check_out(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {out}: give a file ending in {', '.join(FORMATS)}")
    if path.is_dir():
        raise UsageError(f"--out {out}: is a folder", hint=f"give a file name, e.g. {path / 'curves.png'}")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: folder {path.parent} does not exist")
    return path


def figure(runs: dict[str, dict[str, Curve]], metrics: Optional[list[str]] = None) -> Any:
    """A matplotlib Figure: one panel per metric, one line per run (labelled with the run's name)."""
    metrics = metrics or default_metrics(runs.values())
    if not metrics:
        raise UsageError(f"runs {', '.join(runs)} have logged no metrics yet")
    for metric in metrics:
        if not any(metric in curves for curves in runs.values()):
            known = ", ".join(sorted({m for curves in runs.values() for m in curves}))
            raise UsageError(f"--metric {metric}: no run logged it (logged: {known})")
    fig, axes = _panels(len(metrics))
    for ax, metric in zip(axes, metrics):
        for name, curves in runs.items():
            points = curves.get(metric)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=name,
                        marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _panels(n: int) -> tuple[Any, list[Any]]:
    """A figure of `n` panels, two to a row, and its axes in reading order (the spare one hidden)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a login node or in CI
    import matplotlib.pyplot as plt

    columns = min(n, 2)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=100)
    except OSError as err:  # a read-only folder, /proc, a full disk
        raise UsageError(f"--out {out}: cannot be written: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def trial_parameters(overrides: Sequence[str]) -> dict[str, Any]:
    """["optim.lr=0.01", "model.freeze=[a, b]"] (a trial's overrides as its record holds them, one item each,
    so a value may hold spaces) -> {key: number, or the value's text}."""
    params: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = value
    return params


def sweep_figure(rows: list[dict[str, Any]], metric: str, mode: str) -> Any:
    """Panel 1: each trial's metric in trial order, and the best so far. Then one panel per swept
    parameter: the metric against its values (a log axis for a positive range of over 20x; text values
    as categories). `rows`: trial order, each with "overrides" (a list) and "metric" (None: no value yet)."""
    scored = [(i, r) for i, r in enumerate(rows, 1) if r["metric"] is not None]
    if not scored:
        raise UsageError(f"no trial of the sweep has logged {metric} yet: nothing to plot")
    params = [trial_parameters(r["overrides"]) for _, r in scored]
    keys = sorted({k for p in params for k in p if len({str(q.get(k)) for q in params}) > 1})  # what was swept
    fig, flat = _panels(1 + len(keys))
    history = flat[0]
    values = [r["metric"] for _, r in scored]
    best = (max if mode == "max" else min)
    history.plot([i for i, _ in scored], values, "o", label="trial")
    history.plot([i for i, _ in scored], [best(values[:n]) for n in range(1, len(values) + 1)], "-",
                 drawstyle="steps-post", label=f"best so far ({mode})")
    history.set(title=f"{metric} by trial", xlabel="trial")
    history.legend(fontsize="small")
    for ax, key in zip(flat[1:], keys):
        xs = [p.get(key) for p in params]
        if all(isinstance(x, float) for x in xs):
            ax.plot(xs, values, "o")
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.plot([labels.index(str(x)) for x in xs], values, "o")
            ax.set_xticks(range(len(labels)), labels)
        ax.set(title=f"{metric} against {key}", xlabel=key)
    for ax in flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
