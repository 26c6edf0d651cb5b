"""Hangs and crashes on the local Slurm (issue 24): seconds from the moment training stopped to the first
step after the restart. `python -m bench.slurm_restarts` (Slurm up: `make slurm-up`).

- hang: rank 1's data loader sleeps for ever at a set sample (tests/faulty_data.py); the supervisor finds
  no progress for resilience.hang_timeout_s, dumps every stack, kills the step and starts it again in the
  same job (goal: the timeout + <= 30 s);
- crash: rank 1 raises at a set sample; once restarted inside the allocation (resilience.max_crash_restarts=1),
  once through the requeue path (max_crash_restarts=0: slurm.max_failures, `scontrol requeue`), same run
  otherwise (goal: in place <= half of the requeue). The local Slurm requeues in seconds (its scheduler
  runs every 2 s and nothing else waits in its queue); a busy cluster's queue adds minutes to hours to the
  requeue path only.

"Stopped" is when the fault fired (the faulty sample writes the time into its marker file); "training
again" is the wall-clock time rank 0 wrote in its progress report at its first step after the restart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = ["trainer.max_steps=12", "checkpoint.every_steps=4", "checkpoint.best_metric=null", "logging.log_every=1",
         "logging.progress_bar=false", "data.target=faulty_data:digits", "data.kwargs.rank=1",
         f"code_dir={REPO / 'tests'}"]
HANG_TIMEOUT_S = 10.0


def _launch(runs: Path, name: str, overrides: list[str]) -> Path:
    cmd = [sys.executable, "-m", "launcher", "launch", "digits", *STEPS, *overrides, "--cluster", "local_slurm",
           "--run-name", name, "--runs-dir", str(runs)]
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    return runs / name


def _first_step_after(run_dir: Path, since: float, deadline: float) -> float:
    """The time of rank 0's first step report written after `since` (each start begins a new report)."""
    path = run_dir / "progress" / "rank0"
    while time.time() < deadline:
        try:
            report = json.loads(path.read_bytes()[:1024])
        except (OSError, ValueError):
            report = {}
        if report.get("beats", 0) >= 1 and report.get("time", 0) > since:
            return float(report["time"])
        time.sleep(0.1)
    raise TimeoutError(f"{run_dir.name}: no step after the fault within the deadline")


def _measure(runs: Path, name: str, fault: str, overrides: list[str]) -> dict:
    marker = runs / f"{name}-fired"
    run_dir = _launch(runs, name, [f"data.kwargs.faults={fault}", f"data.kwargs.marker={marker}", *overrides])
    kind = fault.partition("@")[0]
    fired = Path(f"{marker}.{kind}")
    deadline = time.time() + 600
    while not fired.exists() and time.time() < deadline:
        time.sleep(0.1)
    stopped = float(fired.read_text())
    again = _first_step_after(run_dir, stopped, deadline)
    while json.loads((run_dir / "run.json").read_text()).get("state") not in ("completed", "stopped", "failed"):
        if time.time() > deadline:
            raise TimeoutError(f"{name} did not end")
        time.sleep(0.5)
    info = json.loads((run_dir / "run.json").read_text())
    return {"seconds": round(again - stopped, 1), "state": info.get("state"),
            "inplace_restarts": info.get("inplace_restarts", {}), "requeues": info.get("requeues", {})}


def run(keep: Path | None = None) -> dict:
    """The three runs, in a temporary folder (or `keep`, to read their logs afterwards)."""
    with tempfile.TemporaryDirectory(prefix="bench-restarts-") as folder:
        runs = keep or Path(folder)
        hang = _measure(runs, "hang", "hang@197", [f"resilience.hang_timeout_s={HANG_TIMEOUT_S}",
                                                   "resilience.max_hang_restarts=1"])
        in_place = _measure(runs, "crash-in-place", "raise@197", ["resilience.max_crash_restarts=1"])
        requeue = _measure(runs, "crash-requeue", "raise@197", ["resilience.max_crash_restarts=0"])
    return {"hang_timeout_s": HANG_TIMEOUT_S, "hang": hang, "crash_in_place": in_place, "crash_requeue": requeue,
            "in_place_vs_requeue": round(in_place["seconds"] / requeue["seconds"], 2)}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    return [
        ("hang -> training again (local Slurm)", f"{r['hang']['seconds']:.1f} s",
         f"timeout {r['hang_timeout_s']:.0f} s + <= 30 s", f"{r['hang']['state']}, {r['hang']['inplace_restarts']}"),
        ("crash -> training again, in place", f"{r['crash_in_place']['seconds']:.1f} s", "<= 0.5 x requeue",
         f"{r['in_place_vs_requeue']:.2f} x requeue"),
        ("crash -> training again, requeued", f"{r['crash_requeue']['seconds']:.1f} s", "",
         f"{r['crash_requeue']['requeues']}"),
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep the runs (their logs)")
    args = parser.parse_args()
    result = run(args.keep)
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print("  ".join(row))
