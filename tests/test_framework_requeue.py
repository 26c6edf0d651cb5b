"""Frameworks that requeue their own Slurm job (issue 22, point 8): the launcher stays the one that
requeues, the script still saves. A Slurm notice reaches the script in the notice signal it handles
(Lightning listens for SIGUSR1; the launcher's jobs get SIGUSR2), and the script's own `scontrol requeue`
goes to the launcher's stand-in (jobs.environments.slurm_requeue), which stops the ranks as Slurm's requeue
would; rank 0 then requeues once and counts it.

The pure tests check the pieces with real processes and a fake scontrol/scancel; the Slurm tests run a
Lightning script (examples/project/lightning_style.py) and a hand-written script that requeues itself
on the local Slurm, preempted with `scancel --signal=USR2 --full`."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, user_cli, user_env, wait_until

LIGHTNING_SCRIPT = REPO / "examples" / "project" / "lightning_style.py"

# Handles SIGUSR1 itself like a framework (saves, then `scontrol requeue` on rank 0) and then waits to be
# killed, SIGTERM ignored: the launcher must end it (KillWait), requeue once, and the second start resumes.
SELF_REQUEUE_SCRIPT = '''\
import os, signal, subprocess, sys, time

state = os.path.join(os.environ["LAUNCHER_CHECKPOINT_DIR"], "state." + os.environ["RANK"])
job = os.environ["SLURM_JOB_ID"]
shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
print("scontrol show job:", shown.split()[0] if shown else "nothing", flush=True)
if os.path.exists(state):
    print("resumed from:", open(state).read(), flush=True)
    sys.exit(0)

def on_notice(signum, frame):
    with open(state, "w") as f:
        f.write(f"saved on {signal.Signals(signum).name}")
    if os.environ["RANK"] == "0":
        print("requeue:", subprocess.run(["scontrol", "requeue", job]).returncode, flush=True)

signal.signal(signal.SIGUSR1, on_notice)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("waiting for the notice", flush=True)
while True:
    time.sleep(0.1)
'''


# ----------------------------------------------------------------------------- pure: the pieces
def _sleeper(handles: tuple[str, ...]) -> subprocess.Popen:
    code = ("import signal, sys, time\n"
            f"for name in {list(handles)!r}: signal.signal(getattr(signal, name), lambda *a: None)\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("handles, notice, delivered", [
    (("SIGUSR1",), "SIGUSR2", signal.SIGUSR1),   # Lightning: the launcher's USR2 notice arrives as USR1
    (("SIGUSR2",), "SIGUSR2", signal.SIGUSR2),   # the runtime API handles both: as it came
    (("SIGUSR1", "SIGUSR2"), "SIGUSR1", signal.SIGUSR1),
    (("SIGTERM",), "SIGUSR2", None),             # a plain script: SIGTERM (the Forwarder's default)
    ((), "SIGTERM", None),                       # not a notice
])
def test_notice_goes_in_the_signal_the_script_handles(handles: tuple[str, ...], notice: str,
                                                      delivered: signal.Signals | None) -> None:
    from jobs.script import notice_for

    proc = _sleeper(handles)
    try:
        assert notice_for(proc.pid, notice) == delivered
    finally:
        proc.kill()
        proc.wait()


def test_script_starts_with_sigusr1_at_its_default_and_sigusr2_ignored(tmp_path: Path) -> None:
    """Lightning installs its notice handler only over SIG_DFL (it treats SIG_IGN as someone else's
    handler): the script must start with SIGUSR1 at its default; USR2, which Slurm sends every process
    of the step, stays ignored so that a plain script does not die of it."""
    from jobs.script import _prepare_child

    code = "import signal; print(signal.getsignal(signal.SIGUSR1).name, signal.getsignal(signal.SIGUSR2).name)"
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=_prepare_child, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["SIG_DFL", "SIG_IGN"], out


def _fake_slurm(folder: Path) -> Path:
    """A folder with a fake scontrol and scancel that log their arguments to calls.log."""
    folder.mkdir()
    for name in ("scontrol", "scancel"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {folder}/calls.log\n')
        tool.chmod(0o755)
    return folder


def _stand_in_call(args: list[str], fake: Path, run_dir: Path) -> subprocess.CompletedProcess:
    from jobs.environments.slurm_requeue import stand_in

    env_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = f"{fake}{os.pathsep}{env_path}"
        with stand_in() as tool:
            env = {**user_env(), "PATH": os.environ["PATH"], "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2",
                   "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "7", "LAUNCHER_RUN_DIR": str(run_dir)}
            assert shutil.which("scontrol", path=env["PATH"]) == str(tool)  # what a script's call finds first
            return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=60)
    finally:
        os.environ["PATH"] = env_path


def test_stand_in_turns_the_scripts_own_requeue_into_a_stop(tmp_path: Path) -> None:
    from jobs.environments import slurm_requeue

    fake, run_dir = _fake_slurm(tmp_path / "bin"), tmp_path / "run"
    run_dir.mkdir()
    for own in ("77", "70_7"):  # the job id, and Lightning's ARRAYJOB_TASK form
        proc = _stand_in_call(["requeue", own], fake, run_dir)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "the launcher requeues the job once" in proc.stdout
    assert (fake / "calls.log").read_text().splitlines() == ["scancel --signal=TERM 77"] * 2  # never scontrol
    assert (run_dir / "requeue_asked" / "77.2").read_text() == "scontrol requeue 70_7\n"
    os.environ.update(SLURM_JOB_ID="77", SLURM_RESTART_COUNT="2")
    try:
        assert slurm_requeue.asked(run_dir)
        os.environ["SLURM_RESTART_COUNT"] = "3"  # the next start of the job has not asked
        assert not slurm_requeue.asked(run_dir)
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]


def test_stand_in_passes_everything_else_to_the_real_scontrol(tmp_path: Path) -> None:
    fake, run_dir = _fake_slurm(tmp_path / "bin"), tmp_path / "run"
    run_dir.mkdir()
    for args in (["show", "job", "77"], ["requeue", "78"], ["requeue", "77,78"], ["requeuehold", "77"]):
        assert _stand_in_call(args, fake, run_dir).returncode == 0
    assert (fake / "calls.log").read_text().splitlines() == [
        "scontrol show job 77", "scontrol requeue 78", "scontrol requeue 77,78", "scontrol requeuehold 77"]
    assert not (run_dir / "requeue_asked").exists()


def test_stand_in_is_on_path_only_while_the_script_runs() -> None:
    from jobs.environments.slurm_requeue import stand_in

    before = os.environ["PATH"]
    with stand_in() as tool:
        assert os.environ["PATH"].split(os.pathsep)[0] == str(tool.parent) and tool.exists()
    assert os.environ["PATH"] == before and not tool.exists()  # the wrapper's own requeue is the real one


def test_a_later_stop_signal_kills_a_script_that_ignores_sigterm_after_kill_wait() -> None:
    """On Slurm the wrapper does what Slurm's requeue would have done to the job: SIGKILL what still runs
    KillWait after the SIGTERM. Here the script ignores SIGTERM; the first signal (the notice) is forwarded,
    the second one starts the count. KillWait is asked for only then (Slurm's costs a `scontrol` call)."""
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    wrapper = ("import os, signal, subprocess, sys, time\n"
               "from jobs.script import Forwarder\n"
               "asked = []\n"
               "f = Forwarder(kill_after=lambda: asked.append(1) or 1.0).install()\n"
               f"f.child = subprocess.Popen([sys.executable, '-c', {code!r}], stdout=subprocess.PIPE, text=True)\n"
               "assert f.child.stdout.readline() == 'ready\\n'\n"
               "start = time.monotonic()\n"
               "os.kill(os.getpid(), signal.SIGUSR2); time.sleep(0.3)\n"
               "assert f.child.poll() is None and not asked  # forwarded as SIGTERM, ignored\n"
               "os.kill(os.getpid(), signal.SIGTERM)\n"
               "code = f.child.wait(timeout=30)\n"
               "print(code, f.signal_name, round(time.monotonic() - start, 1), len(asked))\n")
    out = subprocess.run([sys.executable, "-c", wrapper], env=user_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    code, name, took, asked = out.stdout.split()
    assert code == "-9" and name == "SIGUSR2" and 1.0 <= float(took) < 10 and asked == "1", out.stdout


# ----------------------------------------------------------------------------- local
@pytest.mark.slow
def test_lightning_cancelled_and_relaunched_locally_resumes_with_one_flag(tmp_path: Path) -> None:
    """Lightning on this machine (no Slurm: its SIGTERM handler runs, no hpc checkpoint): `launcher cancel`
    mid-run, then the same command again. `--resume-args '--ckpt_path=last'` is added on the second start
    only, which resumes from the ModelCheckpoint's last.ckpt in the run's own folder and ends at max_steps."""
    pytest.importorskip("lightning")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(LIGHTNING_SCRIPT, project / "lightning_style.py")
    run = ["run", "lightning_style.py", "--procs-per-node", "2", "--resume-args", "--ckpt_path=last", "--run-name",
           "cut", "--", "--root={checkpoint_dir}", "--steps", "40", "--every", "10"]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *run, "--step-sleep", "0.1"], cwd=project,
                             env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    last = project / "runs" / "cut" / "script_checkpoints" / "checkpoints" / "last.ckpt"
    try:
        wait_until(last.exists, "Lightning's last.ckpt", timeout=120)
    finally:
        cancel = user_cli(project, "cancel", "cut")
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 143 and "the script was cancelled (SIGTERM)" in out, out
    assert "finished at step" not in out and "--ckpt_path" not in out, out  # stopped early; a first start: no flag
    assert "it does not use the runtime API" in cancel.stdout, cancel.stdout  # no checkpoint promised
    again = user_cli(project, *run)
    assert again.returncode == 0, again.stdout + again.stderr
    starts = [int(step) for step in re.findall(r"\[rank0\] rank 0: training from step (\d+)", again.stdout)]
    assert len(starts) == 1 and starts[0] >= 10, again.stdout  # from last.ckpt, not from 0
    assert "[rank0] rank 0: finished at step 40" in again.stdout and "[rank1] rank 1: finished at step 40" in \
        again.stdout, again.stdout
    status = user_cli(project, "status", "cut").stdout.splitlines()
    assert "state: completed" in status and "script_start: 2 (resumed earlier progress)" in status, status


# ----------------------------------------------------------------------------- the local Slurm
def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _job_records(job_id: str) -> list[str]:
    """Slurm's own account of the job: one state per start (sacct -D keeps each requeued one)."""
    out = subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "state"], capture_output=True,
                         text=True, timeout=30).stdout
    return out.split()


def _preempt_when(run_dir: Path, text: str, timeout: float = 120) -> str:
    job_id = _info(run_dir)["job_id"]
    log = run_dir / "logs" / "rank0.log"
    wait_until(lambda: log.exists() and text in log.read_text(), text, timeout=timeout)
    subprocess.run(["scancel", "--signal=USR2", "--full", job_id], check=True)
    return job_id


def _finished(run_dir: Path, job_id: str) -> bool:
    return _info(run_dir)["state"] == "completed" and _job_records(job_id)[-1:] == ["COMPLETED"]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("slurm")
def test_lightning_preempted_on_slurm_is_requeued_once_and_resumes(tmp_path: Path) -> None:
    """Lightning's SLURMEnvironment under `launcher run` on Slurm, USR2 to the whole job mid-run: Lightning
    gets the notice (as SIGUSR1), saves its hpc checkpoint and runs `scontrol requeue`; the launcher
    stops the ranks, requeues once (sacct: one REQUEUED start) and counts it; the second start resumes
    from the hpc checkpoint and ends at the step count of a run never stopped."""
    pytest.importorskip("lightning")
    project, runs, steps = tmp_path / "project", tmp_path / "runs", 30
    project.mkdir()
    shutil.copy(LIGHTNING_SCRIPT, project / "lightning_style.py")
    args = ["--", "--steps", str(steps), "--every", "10", "--root={checkpoint_dir}"]
    # Lightning saves from inside its signal handler, with a barrier: a rank that takes the notice while
    # the other is already in the gradients' all-reduce deadlocks both (Lightning's own hazard, seen under
    # load here). Steps that are mostly the sleep (where Python runs the handler at once) keep both ranks
    # taking it at the same place.
    proc = user_cli(project, "run", "lightning_style.py", "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "pl", "--runs-dir", str(runs), *args, "--step-sleep", "0.3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "pl"
    job_id = _preempt_when(run_dir, "step 20\n")
    wait_until(lambda: _finished(run_dir, job_id), "the requeued job to complete", timeout=240)

    info = _info(run_dir)
    assert info["requeues"] == {"preemptions": 1} and info["restarts"] == 1, info
    assert info["last_requeue"] == "SIGUSR2", info
    assert _job_records(job_id) == ["REQUEUED", "COMPLETED"]  # Slurm's view: exactly one requeue
    text = (run_dir / "logs" / "rank0.log").read_text()
    assert "Handling auto-requeue signal: 10" in text, text  # Lightning's own handler got the notice, as SIGUSR1
    assert f"launcher: the script asked to requeue job {job_id}" in text, text  # its scontrol: the stand-in
    hpc = sorted(p.name for p in (run_dir / "script_checkpoints").glob("hpc_ckpt_*.ckpt"))
    assert hpc == ["hpc_ckpt_1.ckpt"], hpc
    starts = [int(s) for s in re.findall(r"rank 0: training from step (\d+)", text)]
    assert len(starts) == 2 and starts[0] == 0 and 20 <= starts[1] < steps, starts  # resumed, not from 0
    assert "Restoring states from the checkpoint path at" in text and "hpc_ckpt_1.ckpt" in text, text
    ends = re.findall(r"rank (\d): finished at step (\d+)", text + (run_dir / "logs" / "rank1.log").read_text())
    # once each, at max_steps as a run never stopped ends (the first start stopped early, before `finished`)
    assert sorted(ends) == [("0", str(steps)), ("1", str(steps))], ends

    status = user_cli(project, "status", "pl", "--runs-dir", str(runs)).stdout
    lines = status.splitlines()
    assert "state: completed" in lines and "slurm_state: COMPLETED" in lines, status
    assert "history: preemptions 1, restarts 1" in lines, status  # one requeue: the launcher's, counted
    assert "script_start: 2 (resumed earlier progress)" in lines, status
    assert "from scratch" not in status, status  # Lightning resumed by itself: no "began again" note


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_script_that_requeues_itself_and_waits_to_be_killed(tmp_path: Path) -> None:
    """Any framework, not only Lightning: a script that handles SIGUSR1, saves, runs `scontrol requeue`
    and then waits for Slurm to kill it (SIGTERM ignored). The launcher ends it (KillWait after its
    SIGTERM), requeues the job once, and the second start finds what the first saved; every other
    scontrol command still reaches Slurm."""
    project, runs = tmp_path / "project", tmp_path / "runs"
    project.mkdir()
    (project / "self_requeue.py").write_text(SELF_REQUEUE_SCRIPT)
    proc = user_cli(project, "run", "self_requeue.py", "--cluster", "local_slurm", "--procs-per-node", "2",
                    "--run-name", "self", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "self"
    logs = [run_dir / "logs" / f"rank{rank}.log" for rank in (0, 1)]
    wait_until(lambda: all(log.exists() and "waiting for the notice" in log.read_text() for log in logs),
               "both ranks to wait", timeout=90)
    job_id = _preempt_when(run_dir, "waiting for the notice")
    wait_until(lambda: _finished(run_dir, job_id), "the requeued job to complete", timeout=120)
    info = _info(run_dir)
    assert info["requeues"] == {"preemptions": 1} and info["restarts"] == 1, info
    assert _job_records(job_id) == ["REQUEUED", "COMPLETED"]
    for rank, log in enumerate(logs):
        text = log.read_text()
        assert f"scontrol show job: JobId={job_id}" in text, text  # the real scontrol, through the stand-in
        assert "resumed from: saved on SIGUSR1" in text, text
    assert "requeue: 0" in logs[0].read_text()
