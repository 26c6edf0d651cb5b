"""Issue 24 (point 2) on the real local Slurm: a hang and a crash inside one job are both restarted inside
the allocation by the batch step's supervisor (jobs.environments.slurm_supervise), without a requeue:
the job never leaves RUNNING, Slurm's restart count stays 0, and the run ends with the weights of an
uninterrupted run (computed locally beside it). The supervisor's decisions case by case, with a stand-in
srun, are tests/test_slurm_supervise.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import Background, final_params, run_cli, wait_until
from jobs.flight_recorder import last_collective
from test_watchdog import STEPS  # the same faulty run as the local case

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]

HANG_S = 8.0


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _job_rows(job_id: str) -> list[str]:
    """sacct's rows of the job itself, one per start (a requeue adds one)."""
    out = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "JobID,State"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_a_hang_and_a_crash_restart_inside_the_job(runs_dir: Path) -> None:
    reference = Background("launch", "digits", *STEPS, "--run-name", "ref", runs_dir=runs_dir)
    try:
        marker = runs_dir / "fired"
        run_cli("launch", "digits", *STEPS, "data.kwargs.faults=hang@197,raise@100", f"data.kwargs.marker={marker}",
                f"resilience.hang_timeout_s={HANG_S}", "resilience.max_hang_restarts=1",
                "resilience.max_crash_restarts=1", "--cluster", "local_slurm", "--run-name", "faulty",
                runs_dir=runs_dir, check=True)
        run_dir = runs_dir / "faulty"
        states = set()

        def done() -> bool:
            job = _info(run_dir).get("job_id")
            if job:
                states.update(row.split("|")[1] for row in _job_rows(job))
            result = run_dir / "result.json"
            return result.exists() and json.loads(result.read_text()).get("outcome") == "completed" \
                and _info(run_dir).get("state") == "completed"

        wait_until(done, "the restarted job to complete", timeout=300)
        reference.finish()
    finally:
        reference.stop()
    info = _info(run_dir)
    wait_until(lambda: [r.split("|")[1] for r in _job_rows(info["job_id"])][-1:] == ["COMPLETED"], "sacct's COMPLETED",
               timeout=60)
    rows = _job_rows(info["job_id"])
    assert len(rows) == 1 and info["restarts"] == 0, rows  # one start of the job: nothing went back to the queue
    assert states <= {"PENDING", "RUNNING", "COMPLETED"}, states
    assert info["inplace_restarts"] == {"hangs": 1, "crashes": 1} and not info.get("requeues"), info
    log = (run_dir / "logs" / "rank0.log").read_text()
    hang = next(line for line in log.splitlines() if "hang: no progress" in line)
    assert "stacks of ranks 0, 1 in logs/stacks/hang-1/" in hang, hang
    assert "faulty_data.py" in (run_dir / "logs" / "stacks" / "hang-1" / "rank1.txt").read_text()
    # each rank's last collectives beside its stack: rank 0 entered one that rank 1, stuck loading, never did
    newest = {r: last_collective(json.loads((run_dir / "logs" / "stacks" / "hang-1" / f"flight-rank{r}.json")
                                            .read_text())) for r in (0, 1)}
    assert newest[0][0] > newest[1][0], newest
    detected = (run_dir / "logs" / "stacks" / "hang-1").stat().st_mtime - float(Path(f"{marker}.hang").read_text())
    print(f"hang detected {detected:.1f} s after it began (timeout {HANG_S} s); {hang}")
    assert "restarting every rank in place from checkpoint step-4 (hangs 1/1)" in log, log[-3000:]
    assert "crashed (rank 1: RuntimeError: injected fault at sample 100)" in log, log[-3000:]
    status = run_cli("status", "faulty", runs_dir=runs_dir, check=True).stdout
    assert "state: completed" in status and "hangs 1, crashes 1" in status, status
    got, want = final_params(run_dir), final_params(runs_dir / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), "weights differ"
