"""`launcher run SCRIPT` on the real local Slurm (issue 9, points 2 and 3): plain torchrun scripts
through submitit and through the rendered sbatch script, a failing script's exit code, and a
runtime-API script preempted with USR2, requeued and resumed to the same weights as a run never stopped."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, Background, read_result, user_cli, user_env, wait_until
from test_script_run import DDP_SCRIPT, FAILING_SCRIPT, LATE_FAILURE_SCRIPT, reports

# No runtime API: its own SIGTERM handler notes the SIGTERM of its first start; a second start (the
# requeued job) ends at once.
PREEMPTIBLE_SCRIPT = '''\
import os, signal, sys, time

if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    print("started again", flush=True)
    sys.exit(0)
received = []

def on_term(signum, frame):
    received.append(signum)
    with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:
        f.write(f"{len(received)} SIGTERM\\n")

signal.signal(signal.SIGTERM, on_term)
print("waiting for SIGTERM", flush=True)
while not received:
    time.sleep(0.05)
time.sleep(1)
print("saved and stopping", flush=True)
'''

# Rank 1 fails on the job's first start only (a transient fault); the requeued job succeeds.
FLAKY_SCRIPT = '''\
import os, sys
import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    print("transient failure", flush=True)
    sys.exit(3)
dist.barrier()
print("worked", flush=True)
'''

# Each start waits until it is told to stop (SIGTERM) or the file argv[1] exists, and says which start it is.
WAITING_SCRIPT = '''\
import os, signal, sys, time

start = os.environ.get("SLURM_RESTART_COUNT", "0")
stopped = []
signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
print(f"start {start} waiting", flush=True)
while not stopped and not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print(f"start {start} ends", flush=True)
'''

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
RESUMABLE = REPO / "examples" / "project" / "train_resumable.py"
ARGS = ["--note", "two words", "--", "--run-name", "x=1"]  # spaces, '--', an option of `launcher run` itself


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _sacct(job_id: str) -> str:
    from launcher.backends.slurm_watch import job_state

    return job_state(job_id)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "ddp.py").write_text(DDP_SCRIPT)
    (folder / "fail.py").write_text(FAILING_SCRIPT)
    (folder / "preemptible.py").write_text(PREEMPTIBLE_SCRIPT)
    (folder / "flaky.py").write_text(FLAKY_SCRIPT)
    (folder / "late.py").write_text(LATE_FAILURE_SCRIPT)
    (folder / "waiting.py").write_text(WAITING_SCRIPT)
    cluster = yaml.safe_load((REPO / "cluster_configs" / "local_slurm.yaml").read_text())
    cluster["slurm"]["max_failures"] = 0  # a failing script is not requeued: its exit code is the run's
    (folder / "slurm_once.yaml").write_text(yaml.safe_dump(cluster))
    return folder


def _assert_both_ranks_ran(run_dir: Path, project: Path) -> None:
    ports = set()
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        seen = reports(log)
        assert len(seen) == 1, f"rank{rank}.log holds {len(seen)} reports, not its own one: {log}"
        assert (seen[0]["RANK"], seen[0]["LOCAL_RANK"], seen[0]["WORLD_SIZE"], seen[0]["LOCAL_WORLD_SIZE"]) == \
            (str(rank), str(rank), "2", "2"), seen
        assert seen[0]["sum"] == 3.0 and seen[0]["argv"] == ARGS and seen[0]["cwd"] == str(run_dir / "work"), seen
        ports.add((seen[0]["MASTER_ADDR"], seen[0]["MASTER_PORT"]))
    assert len(ports) == 1  # one rendezvous
    assert read_result(run_dir)["outcome"] == "completed"


def test_plain_ddp_script_through_submitit(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "ddp.py", "--cluster", "local_slurm", "--procs-per-node", "2", "--run-name", "sub",
                    "--runs-dir", str(runs), "--wait", "--", *ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "sub"
    _assert_both_ranks_ran(run_dir, project)
    info = _info(run_dir)
    assert info["state"] == "completed" and _sacct(info["job_id"]) == "COMPLETED", info
    status = user_cli(project, "status", "sub", "--runs-dir", str(runs)).stdout.splitlines()
    assert "state: completed" in status and not any(line.startswith("exit_code") for line in status), status


def test_plain_ddp_script_through_the_sbatch_script(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "ddp.py", "--cluster", "local_slurm", "--procs-per-node", "2", "--run-name", "sb",
                    "--runs-dir", str(runs), "--sbatch", "--submit", "--", *ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "jobs.environments.slurm" in proc.stdout
    run_dir = runs / "sb"
    job_id = re.search(r"submitted Slurm job (\d+)", proc.stderr).group(1)
    wait_until(lambda: _sacct(job_id) == "COMPLETED", f"job {job_id} to complete", timeout=120)
    _assert_both_ranks_ran(run_dir, project)
    assert _info(run_dir)["state"] == "completed"


def test_failing_script_fails_the_run_with_its_exit_code(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "fail.py", "--cluster", str(project / "slurm_once.yaml"), "--procs-per-node", "2",
                    "--run-name", "bad", "--runs-dir", str(runs), "--wait")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "the script failed with exit code 3" in proc.stdout, proc.stdout
    run_dir = runs / "bad"
    info = _info(run_dir)
    assert info["requeues"] == {} and info["failed_rank"] == 1 and info["exit_code"] == 3, info  # not requeued
    assert "rank 1: " in info["stop_reason"] and "exited with code 3" in info["stop_reason"], info
    assert _sacct(info["job_id"]) == "FAILED"
    status = user_cli(project, "status", "bad", "--runs-dir", str(runs)).stdout.splitlines()
    # "stopped": past slurm.max_failures, as for a recipe's crash; the outcome and code are the script's
    assert "state: stopped" in status and "outcome: failed" in status and "exit_code: 3" in status, status
    assert "rank 1 gives up" in (run_dir / "logs" / "rank1.log").read_text()


def test_rank_failing_after_rank_0_completed_fails_the_run(project: Path, tmp_path: Path) -> None:
    """Rank 0 completed (and wrote so) before rank 1 failed: the run still failed, with rank 1's code."""
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "late.py", "--cluster", str(project / "slurm_once.yaml"), "--procs-per-node", "2",
                    "--run-name", "late", "--runs-dir", str(runs), "--wait")
    assert proc.returncode == 3 and "the script failed with exit code 3" in proc.stdout, proc.stdout + proc.stderr
    info = _info(runs / "late")
    assert info["state"] == "stopped" and "rank 1: " in info["stop_reason"], info
    status = user_cli(project, "status", "late", "--runs-dir", str(runs)).stdout.splitlines()
    assert "state: stopped" in status and "outcome: failed" in status and "exit_code: 3" in status, status


def test_script_failing_once_is_requeued_and_completes(project: Path, tmp_path: Path) -> None:
    """slurm.max_failures: 1 (local_slurm): the failure of the first start is counted and the job
    requeued; that failure's exit code must not fail the second start, which succeeds."""
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "flaky.py", "--cluster", "local_slurm", "--procs-per-node", "2", "--run-name",
                    "flaky", "--runs-dir", str(runs), "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = _info(runs / "flaky")
    assert info["requeues"] == {"failures": 1} and info["restarts"] == 1 and info["state"] == "completed", info
    assert "exit_code" not in info and "failed_rank" not in info, info
    assert read_result(runs / "flaky")["outcome"] == "completed"
    assert "worked" in (runs / "flaky" / "logs" / "rank1.log").read_text()


def test_preemption_notice_reaches_a_plain_script_as_sigterm(project: Path, tmp_path: Path) -> None:
    """Slurm signals every process of the step, the script too: USR2 (whose default action ends a
    process) must not kill a script that handles only SIGTERM before the forwarded SIGTERM reaches it."""
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    proc = user_cli(project, "run", "preemptible.py", "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "plain", "--runs-dir", str(runs), "--", str(marker))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "plain"
    job_id = _info(run_dir)["job_id"]
    logs = [run_dir / "logs" / f"rank{rank}.log" for rank in (0, 1)]
    wait_until(lambda: all(log.exists() and "waiting for SIGTERM" in log.read_text() for log in logs),
               "both ranks to start", timeout=60)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: _info(run_dir)["state"] == "completed" and _sacct(job_id) == "COMPLETED",
               "the requeued job to complete", timeout=90)
    assert _info(run_dir)["requeues"] == {"preemptions": 1}
    text = logs[0].read_text()
    assert "saved and stopping" in text and "started again" in text, text
    assert Path(f"{marker}.0").read_text() == "1 SIGTERM\n" and Path(f"{marker}.1").exists()


def _final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step-{step:09d}"
    return {f"{part}.{key}": value for part in ("model", "optim")
            for key, value in _flat(torch.load(folder / f"{part}.pt", map_location="cpu", weights_only=True))}


def _flat(tree: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _flat(value, f"{prefix}{key}.")]
    if isinstance(tree, (list, tuple)):
        return [item for i, value in enumerate(tree) for item in _flat(value, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)]


def test_runtime_script_preempted_resumes_to_the_same_weights(project: Path, tmp_path: Path) -> None:
    """USR2 (Slurm's preemption notice) mid-run: every rank stops at the same step, rank 0 saves,
    the job is requeued, the script starts again, loads that checkpoint and ends bit-equal to a
    run that was never stopped."""
    runs, steps = tmp_path / "runs", 40
    script = ["--steps", str(steps), "--lr", "0.05"]
    # the run never stopped, on this machine: it trains while the job sleeps between steps and is requeued
    straight = Background("run", str(RESUMABLE), "--procs-per-node", "2", "--run-name", "straight", "--", *script,
                          runs_dir=runs, env=user_env(), cwd=project)
    proc = user_cli(project, "run", str(RESUMABLE), "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "pre", "--runs-dir", str(runs), "--", *script, "--step-sleep", "0.25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "pre"
    job_id = _info(run_dir)["job_id"]
    log = run_dir / "logs" / "rank0.log"
    wait_until(lambda: log.exists() and "step 10 " in log.read_text(), "step 10", timeout=90)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: _info(run_dir)["state"] == "completed" and _sacct(job_id) == "COMPLETED",
               "the requeued job to complete", timeout=120)
    info = _info(run_dir)
    assert info["requeues"] == {"preemptions": 1} and info["restarts"] == 1, info
    assert info["last_requeue"] == "SIGUSR2", info  # a script has no step of the launcher's to name
    text = log.read_text()
    stopped = re.search(r"stopping at step (\d+) \((\w+)\)", text)
    assert stopped and 10 <= int(stopped.group(1)) < steps, text
    assert stopped.group(2) == "SIGUSR2", text  # runtime.stop_signal(): the notice, not the forwarded SIGTERM
    assert f"resumed at step {stopped.group(1)}" in text, text
    straight.finish()
    a, b = _final_state(run_dir, steps), _final_state(runs / "straight", steps)
    assert a.keys() == b.keys() and len(a) > 4
    for key in a:
        same = a[key] == b[key] if not isinstance(a[key], torch.Tensor) else torch.equal(a[key], b[key])
        assert same, f"{key} differs between the preempted run and the straight one"


def test_a_rerun_is_running_with_its_history_and_an_admin_requeue_counts_as_one(project: Path, tmp_path: Path) -> None:
    """USR2 (a preemption), then `scontrol requeue` by hand: during each rerun `status` says running, with
    no outcome of the start before (its result.json is gone) and the history apart; the admin's requeue,
    which the launcher did not make, is counted as its own kind; `launcher logs` has a line for each."""
    runs, go = tmp_path / "runs", tmp_path / "go"
    proc = user_cli(project, "run", "waiting.py", "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "hist", "--runs-dir", str(runs), "--", str(go))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "hist"
    job_id, log = _info(run_dir)["job_id"], run_dir / "logs" / "rank0.log"

    def status() -> list[str]:
        return user_cli(project, "status", "hist", "--runs-dir", str(runs)).stdout.splitlines()

    def rerun_running(start: int) -> list[str]:
        # the log first: rank 0 records the restart before its script prints, while rank 1 may already
        # have begun its start (run.json's attempt) before rank 0 counted the restart
        if f"start {start} waiting" not in log.read_text():
            return []
        shown = status()
        return shown if "state: running" in shown else []

    wait_until(lambda: log.exists() and "start 0 waiting" in log.read_text(), "the first start", timeout=90)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    shown = wait_until(lambda: rerun_running(1), "the rerun after the preemption", timeout=90)
    assert not any(line.startswith(("outcome", "signal", "exit_code")) for line in shown), shown
    assert "history: preemptions 1, restarts 1" in shown and not (run_dir / "result.json").exists(), shown
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    shown = wait_until(lambda: rerun_running(2), "the rerun after scontrol requeue", timeout=90)
    assert "history: preemptions 1, admin_requeues 1, restarts 2" in shown, "\n".join(shown)  # (failures 1 here: a requeue taken for a crash)
    assert not any(line.startswith("outcome") for line in shown), shown
    go.write_text("")
    wait_until(lambda: _info(run_dir)["state"] == "completed" and _sacct(job_id) == "COMPLETED", "the end", timeout=90)
    assert _info(run_dir)["requeues"] == {"preemptions": 1, "admin_requeues": 1}
    logs = user_cli(project, "logs", "hist", "--runs-dir", str(runs)).stdout
    lines = [line for line in logs.splitlines() if line.startswith("launcher: 20")]  # launcher: <time> <event>
    assert len(lines) == 3, logs
    assert "preempted (SIGUSR2); requeueing job" in lines[0] and lines[1].endswith(f"restart 1 of job {job_id}")
    assert lines[2].endswith(f"requeued by an admin (scontrol requeue), restart 2 of job {job_id}"), lines
    final = status()
    assert "state: completed" in final and "history: preemptions 1, admin_requeues 1, restarts 2" in final, final
