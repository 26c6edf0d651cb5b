"""Bayesian sweep vs grid (`make bench BENCH_ARGS="--only bayes"`, or `python -m bench.bayes_sweep`).

One search space on `digits` (learning rate, weight decay, dropout). A 27-point grid (3 x 3 x 3) runs
once; then `launcher sweep --search bayes --prune` (seeded TPE, ASHA pruning, one worker: trials one
after another) for 3 seeds with a budget of 27 trials. The figure: the compute (trial-steps, a pruned
trial counting the steps it ran) that TPE spent, in trial order, up to and including its first
completed trial whose final val/acc reaches the grid's best, as a fraction of the grid's compute;
the median over the seeds (goal <= 0.4). A seed that never reaches it within its budget counts as
its whole spend plus one grid's compute (so it can only raise the median). Everything runs through the
real CLI, trials as ordinary runs; the metric is the recipe's checkpoint.best_metric, val/acc.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FIXED = ["parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=100", "trainer.eval_every=10",
         "checkpoint.every_steps=0"]
GRID = ["optim.lr=0.01,0.1,1.0", "optim.weight_decay=1e-5,1e-4,1e-3", "model.dropout=0,0.25,0.5"]
SPACE = ["optim.lr=loguniform:0.01:1.0", "optim.weight_decay=loguniform:1e-5:1e-3", "model.dropout=uniform:0:0.5"]
METRIC = "val/acc"


def sweep(runs: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "launcher", "sweep", "digits", *FIXED, *args, "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")


def trials(runs: Path, name: str) -> list[dict]:
    """Each trial in trial order: steps run, outcome and final metric (from its result.json)."""
    record = json.loads((runs / "sweeps" / f"{name}.json").read_text())
    names = [t["run_name"] for t in record["trials"]] or sorted(
        p.name for p in runs.iterdir() if p.name.startswith(f"{name}-t"))
    out = []
    for run_name in names:
        result = json.loads((runs / run_name / "result.json").read_text())
        out.append({"run": run_name, "outcome": result["outcome"], "steps": result["step"],
                    "value": result.get(METRIC)})
    return out


def spend_to_reach(rows: list[dict], target: float) -> tuple[int, bool]:
    """Trial-steps up to and including the first completed trial reaching `target`; whether one did."""
    spent = 0
    for row in rows:
        spent += row["steps"]
        if row["outcome"] == "completed" and row["value"] is not None and row["value"] >= target - 1e-12:
            return spent, True
    return spent, False


def run(seeds: int = 3, budget: int = 27) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-bayes-") as tmp:
        runs = Path(tmp)
        sweep(runs, *[a for g in GRID for a in ("--grid", g)], "--name", "grid")
        grid = trials(runs, "grid")
        grid_steps = sum(r["steps"] for r in grid)
        best = max(r["value"] for r in grid)
        per_seed = []
        for seed in range(seeds):
            name = f"tpe{seed}"
            sweep(runs, "--search", "bayes", *[a for p in SPACE for a in ("--param", p)], "--trials", str(budget),
                  "--prune", "--seed", str(seed), "--name", name)
            rows = trials(runs, name)
            spent, reached = spend_to_reach(rows, best)
            per_seed.append({"seed": seed, "trial_steps_to_reach": spent, "reached": reached,
                             "fraction": (spent if reached else spent + grid_steps) / grid_steps,
                             "pruned": sum(r["outcome"] == "pruned" for r in rows), "trials": len(rows),
                             "trial_steps_total": sum(r["steps"] for r in rows),
                             "best": max((r["value"] for r in rows if r["outcome"] == "completed"), default=None)})
            print(json.dumps(per_seed[-1]), flush=True)
    return {"grid_best": best, "grid_trial_steps": grid_steps, "grid_points": len(grid), "budget": budget,
            "seeds": per_seed, "median_fraction": statistics.median(s["fraction"] for s in per_seed)}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    fractions = "/".join(f"{s['fraction']:.2f}" for s in r["seeds"])
    pruned = "/".join(f"{s['pruned']}" for s in r["seeds"])
    return [(f"Bayesian sweep (TPE + ASHA pruning) to the best {METRIC} of a {r['grid_points']}-point grid, digits",
             f"median {r['median_fraction']:.2f} of the grid's trial-steps",
             f"grid {r['grid_trial_steps']} trial-steps, best {r['grid_best']:.4f}",
             f"seeds {fractions} (goal <= 0.4); pruned {pruned} of {r['budget']}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=27)
    args = parser.parse_args()
    result = run(args.seeds, args.budget)
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print("  ".join(row))


if __name__ == "__main__":
    main()
