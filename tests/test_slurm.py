"""Tier 2: the Slurm backend against a real slurmctld/slurmd (scripts/slurm_local.sh)."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import yaml

from conftest import Background, final_params, max_logged_step, read_result, run_cli, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]
LONG = ["trainer.epochs=3", "checkpoint.every_steps=5", "logging.log_every=1", "logging.progress_bar=false"]


def _sacct(job_id: str) -> str:
    from launcher.backends.slurm_watch import job_state

    return job_state(job_id)


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _finished(run_dir: Path) -> bool:
    result = run_dir / "result.json"
    return result.exists() and json.loads(result.read_text())["outcome"] == "completed" \
        and _sacct(_info(run_dir)["job_id"]) == "COMPLETED"


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), f"{key} differs between {a.name} and {b.name}"


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Path]]:
    """The uninterrupted local run of LONG that both preemption cases compare with: one run for both,
    started in the background (it trains while the Slurm job is scheduled and requeued) and waited
    for when first needed."""
    runs = tmp_path_factory.mktemp("straight")
    straight = Background("launch", "vgg_pretrain", *LONG, "--run-name", "straight", runs_dir=runs)

    def wait() -> Path:
        straight.finish()
        return runs / "straight"
    yield wait
    straight.stop()  # a test that failed before waiting leaves it running


def test_two_rank_job_matches_local_run(runs_dir: Path) -> None:
    local = Background("launch", "digits", "--run-name", "onlocal", runs_dir=runs_dir)  # trains while Slurm schedules
    proc = run_cli("launch", "digits", "--cluster", "local_slurm", "--run-name", "onslurm", "--wait",
                   runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted Slurm job" in proc.stdout
    run_dir = runs_dir / "onslurm"
    info = _info(run_dir)
    assert _sacct(info["job_id"]) == "COMPLETED" and info["job_ids"] == [info["job_id"]]
    assert (run_dir / "submitit" / "launch-1").is_dir()
    assert "rank 1 of 2" in (run_dir / "logs" / "rank1.log").read_text()
    local.finish()
    slurm_result, local_result = read_result(run_dir), read_result(runs_dir / "onlocal")
    assert slurm_result["val/acc"] == local_result["val/acc"] and slurm_result["step"] == local_result["step"]
    _assert_same_params(run_dir, runs_dir / "onlocal")
    status = run_cli("status", "onslurm", "--cluster", "local_slurm", runs_dir=runs_dir, check=True).stdout
    assert "state: completed" in status and f"job_id: {info['job_id']}" in status
    logs = run_cli("logs", "onslurm", "--rank", "1", "--cluster", "local_slurm", runs_dir=runs_dir, check=True)
    assert "rank 1 of 2" in logs.stdout


@pytest.mark.parametrize("how", ["usr2", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes_exactly(how: str, runs_dir: Path,
                                                    straight_long: Callable[[], Path]) -> None:
    proc = run_cli("launch", "vgg_pretrain", *LONG, "--cluster", "local_slurm", "--run-name", "pre",
                   runs_dir=runs_dir, check=True)
    run_dir = runs_dir / "pre"
    job_id = _info(run_dir)["job_id"]
    seed = os.environ.get("RESUME_SEED", "0")  # as in test_resume: a failure can be replayed
    target = random.Random(f"{seed}-{how}").randint(8, 20)
    print(f"{how} near step {target} (RESUME_SEED={seed})")
    wait_until(lambda: max_logged_step(run_dir) >= target, f"step {target}")
    if how == "usr2":  # what Slurm sends ahead of preemption; plain scancel reaches every task
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:  # an admin or the scheduler requeueing the job: SIGTERM, then the job starts again
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: _finished(run_dir), "the requeued job to finish")
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "resumed from" in log, log
    info = _info(run_dir)
    if how == "usr2":
        assert info["requeues"] == {"preemptions": 1}, info
        assert "SIGUSR2 at step" in info["last_requeue"]
    assert info["restarts"] == 1  # SLURM_RESTART_COUNT of the second start
    _assert_same_params(run_dir, straight_long())
    del proc


SLOW_FIRST_START_PYTHON = """\
#!{python}
# Stands in for slurm.python: in the job's first start only, every training step sleeps first, so that
# start is still training when the time-limit notice comes, whatever the machine's speed, without using
# the cores; the requeued start trains its few remaining steps at full speed.
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())  # what -m does
# the batch step's supervisor starts every rank with its own interpreter: this stand-in again
sys.executable = os.path.abspath(sys.argv[0])
module, sys.argv = sys.argv[3], sys.argv[3:]
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and module == "submitit.core._submit":
    import jobs.training.trainer
    real = jobs.training.trainer.train_step
    def slow(*args, **kwargs):
        time.sleep(1)
        return real(*args, **kwargs)
    jobs.training.trainer.train_step = slow
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _time_limit(job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return shown.stdout.split("TimeLimit=", 1)[1].split()[0]


def test_time_limit_requeues_as_timeout(runs_dir: Path, tmp_path: Path) -> None:
    """USR2 arrives grace_period_s before the time limit: save, requeue, count it as a time-out.

    slurmctld checks time limits every 30 s and sends the notice up to 30 s early, so with a one-minute
    limit it comes at its first check after the start, when the ranks may not be running yet (a notice
    sent before a job step has tasks is lost). The job starts with slurm.time_min=2 and is cut to one
    minute once it trains: the notice then comes within 30 s, to ranks that handle it."""
    python = tmp_path / "slow_python"  # no space: Slurm's proctrack/linuxproc would never signal it
    python.write_text(SLOW_FIRST_START_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    cluster = yaml.safe_load(Path("cluster_configs/local_slurm.yaml").read_text())
    cluster["slurm"].update(time_min=2, grace_period_s=30, max_timeouts=20, python=str(python))
    path = tmp_path / "short_slurm.yaml"
    path.write_text(yaml.safe_dump(cluster))
    steps = 60  # at over a second a step, the first start is still training when the notice comes
    overrides = ["trainer.epochs=null", f"trainer.max_steps={steps}", "checkpoint.every_steps=500",
                 "logging.log_every=10", "trainer.eval_every=500"]
    run_cli("launch", "vgg_pretrain", *overrides, "--cluster", str(path), "--run-name", "tl", runs_dir=runs_dir,
            check=True)
    run_dir = runs_dir / "tl"
    job_id = _info(run_dir)["job_id"]
    assert _time_limit(job_id) == "00:02:00"  # slurm.time_min
    wait_until(lambda: (run_dir / "first_step.json").exists(), "the first step")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True, timeout=60)
    wait_until(lambda: "timeouts" in _info(run_dir).get("requeues", {}), "a time-out requeue", timeout=150)
    # One time-out is what is checked; the requeued job gets a limit it will not reach.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"], check=True, timeout=60)
    wait_until(lambda: _finished(run_dir), "the run to finish after requeues", timeout=300)
    info = _info(run_dir)
    assert info["requeues"].get("timeouts", 0) >= 1 and "preemptions" not in info["requeues"], info
    assert read_result(run_dir)["step"] == steps
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()


def test_cancelled_job_shows_cancelled(runs_dir: Path) -> None:
    run_cli("launch", "vgg_pretrain", *LONG, "--cluster", "local_slurm", "--run-name", "cx", runs_dir=runs_dir,
            check=True)
    run_dir = runs_dir / "cx"
    wait_until(lambda: max_logged_step(run_dir) >= 3, "step 3")
    job_id = _info(run_dir)["job_id"]
    config = (run_dir / "config.yaml").read_text()
    again = run_cli("launch", "vgg_pretrain", *LONG, "trainer.epochs=4", "--cluster", "local_slurm", "--run-name",
                    "cx", runs_dir=runs_dir)  # a second launch of a running job: refused, nothing rewritten
    assert again.returncode == 2 and f"job {job_id}" in again.stderr, again.stderr
    assert (run_dir / "config.yaml").read_text() == config and _info(run_dir)["job_ids"] == [job_id]
    out = run_cli("cancel", "cx", "--cluster", "local_slurm", runs_dir=runs_dir, check=True).stdout
    assert "cancelled Slurm job" in out
    wait_until(lambda: _sacct(_info(run_dir)["job_id"]) == "CANCELLED", "CANCELLED in sacct")
    wait_until(lambda: (run_dir / "result.json").exists(), "rank 0 to write how it ended")
    status = run_cli("status", "cx", "--cluster", "local_slurm", runs_dir=runs_dir, check=True).stdout
    assert "state: cancelled" in status.splitlines(), status
    time.sleep(3)
    assert _sacct(_info(run_dir)["job_id"]) == "CANCELLED"  # not requeued
    # one story: cancelled, with no `outcome: preempted` beside it and no requeue in its history
    assert "outcome" not in status and "history" not in status and "preempted" not in status, status
    assert read_result(run_dir)["outcome"] == "cancelled" and _info(run_dir)["state"] == "cancelled"


def test_a_job_sbatch_refuses_is_one_line_and_leaves_nothing(runs_dir: Path, tmp_path: Path) -> None:
    """The local Slurm has no GPUs, so sbatch refuses --gpus-per-node: exit 2, one line, no run dir."""
    cluster = yaml.safe_load(Path("cluster_configs/local_slurm.yaml").read_text())
    cluster["slurm"]["gpus_per_node"] = 1
    path = tmp_path / "gpu_slurm.yaml"
    path.write_text(yaml.safe_dump(cluster))
    proc = run_cli("launch", "digits", "parallel.procs_per_node=1", "--cluster", str(path), "--run-name", "nogpu",
                   runs_dir=runs_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # submitit echoes sbatch's own line first; then our one-line error and its HINT
    lines = proc.stderr.splitlines()
    assert lines[-2].startswith("error: sbatch refused the job of run nogpu: sbatch: error:"), proc.stderr
    assert lines[-1].startswith("  HINT: ") and len(lines) <= 3, proc.stderr
    assert not (runs_dir / "nogpu").exists()


# ----------------------------------------------------------------------------- issue 7: points 10 and 11
FAILING_PYTHON = """\
#!{python}
# Stands in for slurm.python: on rank 1 only, the training step raises at step 3 (a real Python
# error in a real rank); everything else runs as `python -u -m MODULE ARGS`.
import os, runpy, sys
sys.path.insert(0, os.getcwd())  # what -m does
# the batch step's supervisor starts every rank with its own interpreter: this stand-in again
sys.executable = os.path.abspath(sys.argv[0])
module, sys.argv = sys.argv[3], sys.argv[3:]
if os.environ.get("SLURM_PROCID") == "1" and module == "submitit.core._submit":
    import jobs.training.trainer
    real, calls = jobs.training.trainer.train_step, []
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure on rank 1 at step 3")
        return real(*args, **kwargs)
    jobs.training.trainer.train_step = failing
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_failing_jobs_requeue_once_then_stop(runs_dir: Path, tmp_path: Path) -> None:
    """Two jobs at once (each spends most of its time waiting for its requeue), each requeued once for its
    failure (max_failures=1), then stopped with the reason:
    - `broken`: every rank fails as it starts (its data folder does not exist);
    - `crash`: rank 1 raises at step 3; srun --kill-on-bad-exit ends the step, often by killing rank 0
      first: the failure is still counted (from the job's outcome)."""
    python = tmp_path / "failing python"
    python.write_text(FAILING_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    cluster = yaml.safe_load(Path("cluster_configs/local_slurm.yaml").read_text())
    cluster["slurm"].update(python=str(python), max_failures=1)
    path = tmp_path / "crash_slurm.yaml"
    path.write_text(yaml.safe_dump(cluster))
    run_cli("launch", "digits", "data.name=image_folder", "data.root=/nonexistent/images", "--cluster",
            "local_slurm", "--run-name", "broken", runs_dir=runs_dir, check=True)
    run_cli("launch", "digits", "trainer.epochs=null", "trainer.max_steps=20", "--cluster", str(path),
            "--run-name", "crash", runs_dir=runs_dir, check=True)

    broken = runs_dir / "broken"
    wait_until(lambda: _info(broken).get("state") == "stopped", "the failure limit", timeout=120)
    wait_until(lambda: _sacct(_info(broken)["job_id"]) in ("FAILED", "COMPLETED"), "a terminal state")
    info = _info(broken)
    assert info["requeues"] == {"failures": 1}
    assert "failures limit of 1 reached" in info["stop_reason"] and "nonexistent" in info["stop_reason"]
    status = run_cli("status", "broken", "--cluster", "local_slurm", runs_dir=runs_dir, check=True).stdout
    assert "failures limit of 1 reached" in status

    crash = runs_dir / "crash"
    wait_until(lambda: _info(crash).get("state") == "stopped", "the failure limit", timeout=180)
    info = _info(crash)
    assert info["requeues"] == {"failures": 1} and info["restarts"] == 1, info
    assert "failures limit of 1 reached" in info["stop_reason"], info
    assert "rank 1: RuntimeError: planted failure on rank 1 at step 3" in info["stop_reason"], info
    assert "rank 1: RuntimeError: planted failure" in info["last_requeue"], info
    assert len(list((crash / "failures").glob("*.rank1"))) == 2  # one per start of the job
    status = run_cli("status", "crash", "--cluster", str(path), runs_dir=runs_dir, check=True).stdout
    assert "state: stopped" in status and "failures limit of 1 reached" in status, status


def _wandb_history_steps(path: Path) -> tuple[str, list[int]]:
    """(run id, history steps) of an offline run file: leveldb-log blocks of wandb's Record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, run_id, steps = path.read_bytes(), 7, b"", "", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return run_id, steps


def test_usr2_to_whole_job_is_a_preemption_with_wandb_and_loader_workers(runs_dir: Path) -> None:
    """`scancel --signal=USR2 --full`: the batch shell, srun, the ranks, their data-loader workers and
    wandb's service all get USR2. The shell and helpers survive; the run is a counted preemption,
    requeued, resumed, and its offline wandb run continues under the same id."""
    steps = 400
    run_cli("launch", "digits", "trainer.epochs=null", f"trainer.max_steps={steps}", "checkpoint.every_steps=0",
            "logging.tracker=wandb", "logging.log_every=10", "logging.progress_bar=false", "data.num_workers=1",
            "--cluster", "local_slurm", "--run-name", "full", runs_dir=runs_dir, check=True,
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    run_dir = runs_dir / "full"
    job_id = _info(run_dir)["job_id"]
    wait_until(lambda: (run_dir / "first_step.json").exists(), "the first step")
    time.sleep(0.5)  # every rank's handler is installed by its first step
    subprocess.run(["scancel", "--signal=USR2", "--full", job_id], check=True, timeout=60)
    wait_until(lambda: _finished(run_dir), "the requeued job to finish", timeout=240)
    info = _info(run_dir)
    assert info["requeues"] == {"preemptions": 1}, f"finished before the signal? {info}"
    assert info["restarts"] == 1 and info["state"] == "completed" and "SIGUSR2 at step" in info["last_requeue"]
    assert read_result(run_dir)["step"] == steps
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and "service process is gone" not in log  # wandb's service lived on
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{info['run_id']}"))
    assert len(runs) == 2, list((run_dir / "wandb").iterdir())
    (id1, first), (id2, second) = (_wandb_history_steps(r / f"run-{info['run_id']}.wandb") for r in runs)
    assert id1 == id2 == info["run_id"]
    assert first and second and max(first) < steps and second[-1] == steps and min(second) > min(first), \
        (first, second)
