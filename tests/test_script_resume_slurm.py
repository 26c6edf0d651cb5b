"""A user's own script on the real local Slurm, started again (issue 22): a preemption notice to the
whole job (`scancel --signal=USR2 --full`) and an admin's `scontrol requeue`. The nanoGPT-style script
continues from its ckpt.pt with `--resume-args '--init_from=resume'` and ends with the weights of a run
never stopped; the tutorial-style script finds its snapshot.pt in the run's own working directory."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, Background, user_cli, user_env, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm")]
EXAMPLE = REPO / "examples" / "project"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return copy


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _completed(run_dir: Path) -> bool:
    from launcher.backends.slurm_watch import job_state

    info = _info(run_dir)
    return info.get("state") == "completed" and job_state(info["job_id"]) == "COMPLETED"


def test_a_nanogpt_style_script_preempted_on_slurm_resumes_to_the_same_weights(project: Path) -> None:
    runs = project / "runs"
    nano = ["--out_dir={checkpoint_dir}", "--max_iters", "60", "--eval_interval", "10"]
    resume = ["--procs-per-node", "2", "--resume-args", "--init_from=resume"]
    straight = Background("run", "nanogpt_style.py", *resume, "--run-name", "straight", "--", *nano, runs_dir=runs,
                          env=user_env(), cwd=project)
    proc = user_cli(project, "run", "nanogpt_style.py", "--cluster", "local_slurm", *resume, "--run-name", "pre",
                    "--", *nano, "--iter_sleep", "0.25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note:" not in proc.stderr  # it has resume arguments: nothing to warn about
    run_dir = runs / "pre"
    log = run_dir / "logs" / "rank0.log"
    wait_until(lambda: log.exists() and "iter 10:" in log.read_text(), "the first ckpt.pt", timeout=120)
    subprocess.run(["scancel", "--signal=USR2", "--full", _info(run_dir)["job_id"]], check=True)
    wait_until(lambda: _completed(run_dir), "the requeued job to complete", timeout=180)
    info = _info(run_dir)
    assert info["requeues"] == {"preemptions": 1} and info["attempt"] == 2 and info["resuming"] is True, info
    text = log.read_text()
    assert "start 2: continues earlier progress, with --init_from=resume" in text and "resuming from iter" in text
    straight.finish()
    final = [json.loads((runs / name / "script_checkpoints" / "final.json").read_text()) for name in ("pre", "straight")]
    assert final[0] == final[1] and final[0]["iter_num"] == 60


def test_an_admin_requeue_finds_the_tutorial_snapshot_in_the_run(project: Path) -> None:
    """Requeued by hand mid-run, the script resumes from the snapshot.pt it wrote into the run's work folder
    and ends with the weights of a run that went straight through."""
    epochs = ["--total_epochs", "6"]
    straight = Background("run", "tutorial_style.py", "--procs-per-node", "2", "--run-name", "straight", "--",
                          *epochs, runs_dir=project / "runs", env=user_env(), cwd=project)
    proc = user_cli(project, "run", "tutorial_style.py", "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "tut", "--", *epochs, "--epoch_sleep", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: on slurm a preempted or requeued run starts" in proc.stderr  # said once, up front
    run_dir = project / "runs" / "tut"
    snapshot = run_dir / "work" / "snapshot.pt"
    wait_until(snapshot.exists, "the first snapshot", timeout=120)
    subprocess.run(["scontrol", "requeue", _info(run_dir)["job_id"]], check=True)
    wait_until(lambda: _completed(run_dir), "the requeued job to complete", timeout=180)
    text = (run_dir / "logs" / "rank0.log").read_text()
    assert "Resuming training from snapshot at Epoch" in text, text
    assert not (project / "snapshot.pt").exists() and _info(run_dir)["attempt"] == 2
    straight.finish()
    final = [json.loads((project / "runs" / name / "work" / "final.json").read_text()) for name in ("tut", "straight")]
    assert final[0] == final[1]
    status = user_cli(project, "status", "tut").stdout
    assert "warning: start 2: the script uses neither --resume-args nor the runtime API" in status, status
