"""`launcher sbatch` against the real local Slurm (tier 2, `-m slurm`): the script submitted, run to
completion, preempted with USR2 to the batch shell, requeued by rank 0 and resumed; and a script full
of shell syntax read back intact by sbatch and srun. Tier 1 (rendering, quoting, the trap) is in
test_sbatch.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import read_result, run_cli, wait_until
from launcher.backends.slurm_watch import job_state
from jobs.schema.run_dir import Run
from launcher.sbatch import render_sbatch
from jobs.schema import load_cluster, load_recipe
from test_sbatch import HOSTILE_ENV, hostile_cluster, write_cluster

# ----------------------------------------------------------------------------- tier 2: real Slurm
# The `slurm` fixture (conftest.py) starts the local Slurm, skipping only where it cannot be installed.
def wait_done(run_dir: Path, job_id: str, timeout: float = 180) -> str:
    """Until Slurm says the job ended and rank 0 is not in the middle of requeueing it."""
    def ended() -> str:
        state = job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL") \
                and Run(run_dir.name, run_dir).info().state != "requeued":
            return state
        return ""

    try:
        return wait_until(ended, f"job {job_id} to end", timeout, poll=1)
    except TimeoutError as err:
        subprocess.run(["scancel", job_id], timeout=60)
        raise AssertionError(f"{err} (state {job_state(job_id)}); "
                             f"{_tail(run_dir / f'slurm-{job_id}.out')}") from None


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"{path} missing"


def submit(runs_dir: Path, name: str, *overrides: str) -> tuple[Path, str]:
    proc = run_cli("sbatch", "digits", *overrides, "--cluster", "local_slurm", "--run-name", name, "--submit",
                   runs_dir=runs_dir, check=True)
    run_dir = runs_dir / name
    info = json.loads((run_dir / "run.json").read_text())
    assert f"submitted Slurm job {info['job_id']} for run {name}" in proc.stderr
    assert info["job_ids"] == [info["job_id"]] and info["state"] in ("submitted", "running", "completed")
    return run_dir, info["job_id"]


@pytest.mark.slurm
def test_slurm_usr2_to_batch_shell_requeues_and_resumes(slurm: None, runs_dir: Path) -> None:
    """`scancel --signal=USR2 --batch`, as `--signal=B:USR2@grace` does: trap -> srun -> ranks save,
    rank 0 requeues; the second run resumes from the checkpoint and completes (srun exits 0, both ranks
    log, `status` says completed: one job for both cases, a requeue costs seconds)."""
    steps = 500
    run_dir, job_id = submit(runs_dir, "pre", f"trainer.max_steps={steps}", "trainer.epochs=null",
                             "checkpoint.every_steps=0")
    deadline = time.time() + 120
    while not (run_dir / "first_step.json").exists():  # written after step 1: every rank's handler is installed
        assert time.time() < deadline and job_state(job_id) in ("PENDING", "RUNNING", "UNKNOWN"), \
            _tail(run_dir / f"slurm-{job_id}.out")
        time.sleep(0.2)
    time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True, timeout=60)
    assert wait_done(run_dir, job_id) == "COMPLETED", _tail(run_dir / f"slurm-{job_id}.out")
    out = (run_dir / f"slurm-{job_id}.out").read_text()
    result, info = read_result(run_dir), json.loads((run_dir / "run.json").read_text())
    assert info["requeues"] == {"preemptions": 1}, f"the run finished before the signal? {info}\n{out[-3000:]}"
    assert result["outcome"] == "completed" and result["step"] == steps
    assert "slurm supervisor: SIGUSR2, forwarding to srun" in out
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("rank*.log"))
    assert "preempted at step" in logs and "resumed from" in logs
    assert info["restarts"] == 1 and info["state"] == "completed"
    assert (run_dir / "logs" / "rank0.log").exists() and (run_dir / "logs" / "rank1.log").exists()
    assert "srun exited with status 0" in out.rsplit("slurm supervisor: SIGUSR2", 1)[1]  # the second start's srun
    status = run_cli("status", "pre", "--cluster", "local_slurm", runs_dir=runs_dir, check=True).stdout
    assert f"job_id: {job_id}" in status and "state: completed" in status


@pytest.mark.slurm
def test_slurm_runs_hostile_script_intact(slurm: None, tmp_path: Path) -> None:
    """Real sbatch and srun read the quoted header and command back to the exact values: the job name,
    the output file inside a run directory full of shell syntax, argv and env of every task."""
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    data = yaml.safe_load(hostile_cluster(tmp_path, pwned).read_text())
    data["slurm"].update(partition="debug", account=None, constraint=None, time_min=5, grace_period_s=60,
                         extra_sbatch=["--comment=`touch " + str(pwned) + "/PWNED_c` ; #x"])
    cluster = load_cluster(str(write_cluster(tmp_path / "hostile.yaml", data["slurm"])))
    name = "odd name $HOME `id` 'q\" #x %j"
    run = Run(name, tmp_path / "runs $(touch PWNED_d)" / name)
    run.dir.mkdir(parents=True)
    run.write_configs(load_recipe("digits"), cluster)
    # stands in for python: the batch step's supervisor runs for real (and starts this file as every rank's
    # python), each rank records what it received
    dump = tmp_path / "dump rank.py"
    dump.write_text(f"#!{sys.executable}\nimport json, os, runpy, sys\n"
                    "if 'jobs.environments.slurm_supervise' in sys.argv:\n"
                    "    sys.executable, sys.argv = __file__, ['supervise', *sys.argv[sys.argv.index('-m') + 2:]]\n"
                    "    runpy.run_module('jobs.environments.slurm_supervise', run_name='__main__')\n"
                    "keys = " + repr(sorted(HOSTILE_ENV)) + "\n"
                    "json.dump({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in keys}},\n"
                    "          open(os.path.join(sys.argv[-1], f\"dump-{os.environ['SLURM_PROCID']}.json\"), 'w'))\n")
    dump.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(load_recipe("digits"), cluster, run, str(dump)))
    sub = subprocess.run(["sbatch", "--parsable", str(script)], cwd=pwned, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 120
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, f"job {job_id} did not finish: {job_state(job_id)}"
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                           timeout=60).stdout
    output = run.dir / f"slurm-{job_id}.out"  # %j expanded, the run name's literal %j kept
    assert job_state(job_id) == "COMPLETED", _tail(output)
    assert f"JobName={name} " in shown and f"Comment=`touch {pwned}/PWNED_c` ; #x " in shown
    assert "srun exited with status 0" in output.read_text()
    expected_env = {k: v.format(pwned=pwned) for k, v in HOSTILE_ENV.items()}
    for rank in (0, 1):
        seen = json.loads((run.dir / f"dump-{rank}.json").read_text())
        assert seen["argv"] == ["-u", "-m", "jobs.environments.slurm", "--run-dir", str(run.dir)]
        assert seen["env"] == expected_env
    assert not list(tmp_path.rglob("PWNED*"))
