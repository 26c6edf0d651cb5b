"""`launcher plot`: the curves drawn are the runs' logged values (checked in the figure's own line
data, and in the pixels of the file a real run's plot writes), a resumed run's repeated steps drawn
once with the value it kept, and bad input refused with one error line (and its hint), exit 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from launcher import plot
from jobs.schema.errors import UsageError


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_keep_the_last_value_of_a_step_logged_twice(tmp_path: Path) -> None:
    """A run preempted after step 3 and resumed from its step-2 checkpoint logs step 3 again."""
    write_metrics(tmp_path, [
        {"step": 1, "time": 1.0, "train/loss": 2.0, "lr": 0.1, "epoch": 0, "samples_per_s": 9.0},
        {"step": 2, "train/loss": 1.5, "lr": 0.1},
        {"step": 2, "val/loss": 1.6, "val/acc": 0.4},
        {"step": 3, "train/loss": 1.2, "lr": 0.1},
        {"step": 3, "train/loss": 1.1, "lr": 0.1},  # after the resume
        {"step": 4, "train/loss": float("nan")},
    ])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # cut short by a crash
    curves = plot.read_curves(tmp_path)
    assert curves == {"train/loss": [(1, 2.0), (2, 1.5), (3, 1.1)], "lr": [(1, 0.1), (2, 0.1), (3, 0.1)],
                      "val/loss": [(2, 1.6)], "val/acc": [(2, 0.4)], "samples_per_s": [(1, 9.0)]}
    # rates (samples_per_s, tokens_per_s, mfu, ...) are drawn when asked for with --metric, not by default
    assert plot.default_metrics([curves]) == ["train/loss", "val/loss", "val/acc"]


def test_the_figure_holds_each_runs_values_per_metric() -> None:
    runs = {"lr-0.01": {"train/loss": [(1, 2.0), (2, 1.0)], "val/acc": [(2, 0.5)]},
            "lr-0.1": {"train/loss": [(1, 2.5), (2, 0.7), (3, 0.4)], "val/acc": [(2, 0.6), (3, 0.8)], "lr": [(1, 0.1)]}}
    fig = plot.figure(runs)
    shown = {ax.get_title(): {line.get_label(): [tuple(p) for p in line.get_xydata().tolist()] for line in ax.lines}
             for ax in fig.axes if ax.get_visible()}
    assert shown == {metric: {name: [(float(s), v) for s, v in curves[metric]] for name, curves in runs.items()}
                     for metric in ("train/loss", "val/acc")}
    only_lr = plot.figure(runs, ["lr"])
    assert [[line.get_label() for line in ax.lines] for ax in only_lr.axes if ax.get_visible()] == [["lr-0.1"]]


@pytest.mark.slow
def test_a_real_runs_plot_is_written_and_bad_input_is_refused(tmp_path: Path, runs_dir: Path) -> None:
    from PIL import Image

    run_cli("launch", "digits", "trainer.max_steps=6", "trainer.eval_every=3", "logging.log_every=1",
            "parallel.procs_per_node=1", "--run-name", "curves", runs_dir=runs_dir, check=True)
    out = tmp_path / "curves.png"
    done = run_cli("plot", "curves", "--out", str(out), runs_dir=runs_dir, check=True)
    assert f"wrote {out}: train/loss, val/loss, val/acc of curves" in done.stdout
    curves = plot.read_curves(runs_dir / "curves")
    assert [s for s, _ in curves["train/loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in curves["val/acc"]] == [3, 6]
    image = Image.open(out).convert("L")
    assert image.size == (1280, 800)  # two columns of panels, two rows: three metrics
    assert sum(1 for count in image.histogram() if count) > 10  # lines, labels and axes, not a blank canvas

    cases = {("plot", "curves", "--metric", "val/f1", "--out", str(tmp_path / "a.png")): "--metric val/f1: no run",
             ("plot", "curves", "--out", str(tmp_path / "a.jpeg")): "give a file ending in .png",
             ("plot", "curves", "--out", str(tmp_path / "none" / "a.png")): "does not exist",
             ("plot", "nope", "--out", str(tmp_path / "a.png")): "nope: no such run",
             ("plot", "../x", "--out", str(tmp_path / "a.png")): "run"}
    for args, words in cases.items():
        refused = run_cli(*args, runs_dir=runs_dir)
        assert refused.returncode == 2 and words in refused.stderr, (args, refused.stderr)
        lines = refused.stderr.strip().splitlines()  # the error, and a HINT line where there is one
        assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "runs"]


def test_no_metrics_yet_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        plot.read_curves(tmp_path)


def test_a_sweeps_history_and_each_parameter_hold_the_trials_values() -> None:
    frozen = ["model.freeze=[features]", "model.freeze=[features, classifier]"]  # a value with a space
    rows = [{"overrides": ["optim.lr=0.001", "model.dropout=0.1", "optim.name=sgd", frozen[0]], "metric": 0.50},
            {"overrides": ["optim.lr=0.1", "model.dropout=0.1", "optim.name=adamw", frozen[1]], "metric": 0.90},
            {"overrides": ["optim.lr=0.01", "model.dropout=0.1", "optim.name=sgd", frozen[0]], "metric": None},
            {"overrides": ["optim.lr=0.03", "model.dropout=0.1", "optim.name=sgd", frozen[0]], "metric": 0.70}]
    fig = plot.sweep_figure(rows, "val/acc", "max")  # the third trial is still running: no value yet
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["val/acc by trial", "val/acc against model.freeze", "val/acc against optim.lr",
                            "val/acc against optim.name"]
    assert [t.get_text() for t in panels["val/acc against model.freeze"].get_xticklabels()] == [
        "[features, classifier]", "[features]"]
    trials, best = panels["val/acc by trial"].lines
    assert trials.get_xydata().tolist() == [[1, 0.5], [2, 0.9], [4, 0.7]]
    assert best.get_xydata().tolist() == [[1, 0.5], [2, 0.9], [4, 0.9]]  # best so far, for max
    lr = panels["val/acc against optim.lr"]
    assert lr.lines[0].get_xydata().tolist() == [[0.001, 0.5], [0.1, 0.9], [0.03, 0.7]] and lr.get_xscale() == "log"
    name = panels["val/acc against optim.name"]
    assert name.lines[0].get_xydata().tolist() == [[1, 0.5], [0, 0.9], [1, 0.7]]
    assert [t.get_text() for t in name.get_xticklabels()] == ["adamw", "sgd"]
    assert plot.sweep_figure(rows, "val/loss", "min").axes[0].lines[1].get_ydata().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(UsageError, match="no trial of the sweep has logged val/acc"):
        plot.sweep_figure([{"overrides": ["optim.lr=0.1"], "metric": None}], "val/acc", "max")
