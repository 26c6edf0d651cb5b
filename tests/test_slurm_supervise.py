"""Issue 24 (point 2 on Slurm), tier 1: the batch step's supervisor (jobs.environments.slurm_supervise)
with a stand-in `srun` and `scontrol` first on PATH, so each case takes seconds. The real thing, with
real ranks on the local Slurm, is tests/test_slurm_restarts.py.

- a crash restarts every rank in place while resilience.max_crash_restarts allows (srun again, in the
  same job, with the restart's number; nothing requeued), then falls to the requeue path;
- a hang (no progress for resilience.hang_timeout_s) dumps the stacks with `srun --overlap` beside the
  hung step, kills the step, and restarts it; past resilience.max_hang_restarts the failure path counts it;
- a TERM (the job is ending) restarts nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.schema import load_cluster, load_recipe
from jobs.schema.run_dir import LOGS, Run
from launcher.runs import prepare_run

REPO = Path(__file__).resolve().parent.parent

# srun: `--overlap` calls answer with a stack; step calls do what STEPS says for their turn
# (exit N, or "hang": sleep until killed), and every call is logged with its restart number.
SRUN = """\
#!{python}
import json, os, sys, time
log = {log!r}
steps = {steps!r}
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "restart": os.environ.get("LAUNCHER_RESTART")}}) + "\\n")
if "--overlap" in sys.argv:
    print(json.dumps({{"host": "h", "stacks": {{"0": 'Thread 1 (idle): "MainThread"\\n    hang (x.py:3)'}}}}))
    sys.exit(0)
turn = sum(1 for line in open(log) if "--overlap" not in line) - 1
what = steps[min(turn, len(steps) - 1)]
if what == "hang":
    time.sleep(600)
sys.exit(int(what))
"""
SCONTROL = """\
#!/bin/sh
echo "$*" >> {log}
[ "$1" = show ] && echo "JobId=5 JobName=x JobState=RUNNING Reason=None"
exit 0
"""


def _run(tmp_path: Path, overrides: list[str]) -> Run:
    recipe = load_recipe("digits", ["parallel.procs_per_node=1", *overrides])
    return prepare_run(recipe, load_cluster("local_slurm"), "s", tmp_path / "runs", "auto")


def _supervise(tmp_path: Path, run: Run, steps: list[str], term_after_s: float = 0.0) -> tuple[int, list[dict], str]:
    """Run the supervisor on `run` with the stand-ins; its exit code, srun's calls, scontrol's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(SRUN.format(python=sys.executable, log=str(tmp_path / "srun.jsonl"), steps=steps))
    (bin_dir / "scontrol").write_text(SCONTROL.format(log=tmp_path / "scontrol.log"))
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.environments.slurm_supervise", "--run-dir", str(run.dir),
                             "--forward-notices"], env=env, stderr=subprocess.PIPE, text=True)
    if term_after_s:
        time.sleep(term_after_s)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    srun = [json.loads(line) for line in (tmp_path / "srun.jsonl").read_text().splitlines()]
    scontrol = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    return proc.returncode, srun, scontrol + err


def _log(run: Run) -> str:
    return (run.dir / LOGS / "rank0.log").read_text()


def test_a_crash_restarts_every_rank_in_place_then_falls_back_to_a_requeue(tmp_path: Path) -> None:
    run = _run(tmp_path, ["resilience.max_crash_restarts=1"])
    code, srun, said = _supervise(tmp_path, run, ["3", "3", "0"])
    assert code == 3, said
    assert [c["restart"] for c in srun] == ["0", "1"]  # the second start knows it is a restart
    info = run.info()
    assert info.inplace_restarts == {"crashes": 1} and info.resume == "auto"
    assert "crashed (" in _log(run) and "restarting every rank in place" in _log(run)
    # the budget spent, the second crash is a failure: counted and requeued (slurm.max_failures=1)
    assert info.requeues == {"failures": 1} and "requeue 5" in said and info.state == "requeued"
    assert "not restarted: crashes limit of 1 reached" in info.inplace_stop


def test_a_crash_without_a_budget_is_requeued_as_before(tmp_path: Path) -> None:
    run = _run(tmp_path, [])
    code, srun, said = _supervise(tmp_path, run, ["3", "0"])
    assert code == 3 and len(srun) == 1, said
    assert run.info().requeues == {"failures": 1} and not run.info().inplace_restarts and "requeue 5" in said


def test_a_hang_dumps_every_stack_kills_the_step_and_restarts_it(tmp_path: Path) -> None:
    run = _run(tmp_path, ["resilience.hang_timeout_s=2", "resilience.max_hang_restarts=1"])
    code, srun, said = _supervise(tmp_path, run, ["hang", "0"])
    assert code == 0, said
    overlap = [c["argv"] for c in srun if "--overlap" in c["argv"]]
    assert len(overlap) == 1 and "--jobid=5" in overlap[0] and "jobs.stacks" in overlap[0], srun
    assert [c["restart"] for c in srun if "--overlap" not in c["argv"]] == ["0", "1"]
    assert run.info().inplace_restarts == {"hangs": 1} and "requeue" not in said
    log = _log(run)
    assert "hang: no progress for" in log and "stacks of ranks 0 in logs/stacks/hang-1/" in log, log
    assert "hung (" in log and "(hangs 1/1)" in log


def test_a_hang_past_its_budget_is_a_failure_of_the_job(tmp_path: Path) -> None:
    run = _run(tmp_path, ["resilience.hang_timeout_s=2", "resilience.max_hang_restarts=0",
                          "parallel.procs_per_node=1"])
    code, srun, said = _supervise(tmp_path, run, ["hang"])
    assert code != 0 and len([c for c in srun if "--overlap" not in c["argv"]]) == 1, said
    info = run.info()
    assert "not restarted: hangs limit of 0 reached" in info.inplace_stop
    assert info.requeues == {"failures": 1} and info.last_requeue.startswith("hang: no progress")


def test_a_term_restarts_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, ["resilience.max_crash_restarts=3", "resilience.hang_timeout_s=60"])
    code, srun, said = _supervise(tmp_path, run, ["hang"], term_after_s=2.0)
    assert len(srun) == 1 and not run.info().inplace_restarts and "requeue" not in said, said


def test_a_rank_on_another_node_is_watched_not_taken_for_ended(tmp_path: Path) -> None:
    """Slurm's supervisor reads every node's reports from the shared run folder: a pid from another host means
    nothing here, so that rank counts as alive (watched), while a rank of this host whose process ended is not."""
    import socket

    from jobs.watchdog import Watchdog

    run = _run(tmp_path, [])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for rank, host, pid in ((0, socket.gethostname(), gone.pid), (1, "another-node", gone.pid)):
        run.progress_file(rank).parent.mkdir(parents=True, exist_ok=True)
        run.progress_file(rank).write_text(json.dumps({"pid": pid, "beats": 3, "step": 3, "slowest_s": 0.1,
                                                       "host": host}))
    now = [100.0]
    dog = Watchdog(run, 2, 5.0, clock=lambda: now[0])
    assert dog.check() is None
    now[0] += 6
    hang = dog.check()
    assert hang is not None and hang.ranks == (1,) and hang.steps == {1: 3}
