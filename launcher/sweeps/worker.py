"""A Bayesian sweep's worker as a process of its own: `python -m launcher.sweeps.worker --sweep-dir DIR --worker I`.

What each element of a Slurm job array runs (and each of several local workers): it reads the sweep's
worker.json (written by `launcher sweep`), then claims, runs and tells trials (`bayes.work`) until the
budget is spent. The trial's ranks start through the backend's `run_trial_here`. A signal to this
process (Slurm's USR2 before a preemption or the time limit, scancel's TERM) reaches the trial's ranks
through it; they save, and the trial resumes as the same trial when the worker starts again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from launcher.preflight import Target
from launcher.sweeps.bayes import WORKER_JSON, BayesSpec, Sweep, work
from jobs.schema.errors import UsageError


def load_sweep(folder: Path, cluster: Optional[str] = None) -> Sweep:
    """The sweep of `folder` (`<runs_dir>/sweeps/<name>`), in the directory it was launched from; `cluster`: this
    worker's own cluster config instead of the sweep's (a VM worker's, naming the VMs its trials run on)."""
    data = json.loads((folder / WORKER_JSON).read_text())
    os.chdir(os.path.expanduser(data["cwd"]))  # recipe names, code_dir and relative paths resolve as they did at launch
    return Sweep(folder.name, BayesSpec.from_raw(data["spec"]), Target.load(cluster or data["cluster"]),
                 folder.parent.parent, data["metric"], data["mode"], data.get("study", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep-dir", type=Path, required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--cluster", help="this worker's cluster config (default: the sweep's)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_dir.resolve(), args.cluster)
        return work(sweep, args.worker, sweep.run_here)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
