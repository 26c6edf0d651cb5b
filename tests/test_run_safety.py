"""Run directories under concurrent and hostile use: run.json updates from many processes, partial
files, pids reused by other processes, unusable runs directories, run directories that lead elsewhere."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from jobs.schema.run_dir import Run


def _default_signals() -> None:
    """A forked worker inherits the Python handlers of the pytest process it came from (a test earlier in this
    worker may have installed one): with SIGTERM's default back, Pool.terminate() always ends it."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def _set_key(args: tuple[str, int]) -> None:
    run_dir, i = args
    Run("many", Path(run_dir)).update(**{f"key{i}": i})


def test_concurrent_updates_keep_every_key(tmp_path: Path) -> None:
    run = Run("many", tmp_path / "many")
    run.dir.mkdir()
    run.update(run_name="many")
    with multiprocessing.get_context("fork").Pool(8, initializer=_default_signals) as pool:
        pool.map(_set_key, [(str(run.dir), i) for i in range(300)], chunksize=1)
    info = json.loads(run.info_path.read_text())
    assert {f"key{i}" for i in range(300)} <= info.keys() and info["run_name"] == "many"
    assert sorted(p.name for p in run.dir.iterdir()) == ["run.json", "run.json.lock"]  # no temp file left


def _write_run(runs_dir: Path, name: str, **info: object) -> Path:
    run_dir = runs_dir / name
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_name": name, "backend": "local", "launches": 1, **info}))
    return run_dir


def test_status_reads_partial_files(runs_dir: Path) -> None:
    run_dir = _write_run(runs_dir, "half")
    (run_dir / "result.json").write_text('{"outcome": "compl')  # the trainer was cut off while writing it
    proc = run_cli("status", "half", runs_dir=runs_dir)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "state: unknown" in proc.stdout and "note: result.json unreadable" in proc.stdout

    (run_dir / "result.json").write_text('{"outcome": "completed", "step": "7"}')  # valid JSON, wrong type
    proc = run_cli("status", "half", runs_dir=runs_dir)
    assert proc.returncode == 0 and "state: unknown" in proc.stdout and "'step' is '7'" in proc.stdout

    (run_dir / "run.json").write_text('{"run_name": "ha')
    proc = run_cli("status", "half", runs_dir=runs_dir)
    assert proc.returncode == 0 and "note: run.json unreadable" in proc.stdout, proc.stderr


def test_launch_refuses_an_unreadable_run_json(runs_dir: Path) -> None:
    run_dir = _write_run(runs_dir, "broken")
    (run_dir / "run.json").write_text("[1, 2]")
    proc = run_cli("launch", "digits", "trainer.max_steps=2", "--run-name", "broken", runs_dir=runs_dir)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {run_dir / 'run.json'}: unreadable"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]  # nothing written over it


def test_cancel_never_signals_a_process_that_reused_the_pid(runs_dir: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        start = int(Path(f"/proc/{bystander.pid}/stat").read_text().rpartition(")")[2].split()[19])
        _write_run(runs_dir, "other", pid=bystander.pid, pid_start=start + 1, launcher_pid=bystander.pid,
                   launcher_start=start + 1, state="running")
        _write_run(runs_dir, "old", pid=bystander.pid, launcher_pid=bystander.pid, state="running")  # no start time
        for name in ("other", "old"):
            assert "state: running" not in run_cli("status", name, runs_dir=runs_dir, check=True).stdout
            out = run_cli("cancel", name, runs_dir=runs_dir, check=True).stdout
            assert out.strip() == f"run {name} is not running"
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_a_dead_unreaped_rank_is_not_running(runs_dir: Path) -> None:
    """A killed launcher leaves its rank a zombie until init reaps it: kill(pid, 0) still succeeds and
    /proc still shows the recorded start time, but the run is not running and may be launched again."""
    zombie = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{zombie.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":  # exited, not reaped (no wait() yet)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = int(stat.read_text().rpartition(")")[2].split()[19])
        _write_run(runs_dir, "dead", pid=zombie.pid, pid_start=start, launcher_pid=zombie.pid, launcher_start=start)
        assert "state: running" not in run_cli("status", "dead", runs_dir=runs_dir, check=True).stdout
        assert run_cli("cancel", "dead", runs_dir=runs_dir, check=True).stdout.strip() == "run dead is not running"
    finally:
        zombie.wait()


def test_cancel_refuses_pids_that_mean_a_group(runs_dir: Path) -> None:
    """pid 0 or a negative pid in a (hand-edited) run.json would signal a whole process group (-1: every
    process). Each case here is contained, so that the old code fails this test without harm: the
    `cancel` runs in a session of its own (pid 0 hits only it), and -N names the group of a `sleep`."""
    group = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        for name, pid in (("zero", 0), ("group", -group.pid)):
            _write_run(runs_dir, name, pid=pid, launcher_pid=pid)
            cancel = subprocess.run([sys.executable, "-m", "launcher", "cancel", name, "--runs-dir", str(runs_dir)],
                                    cwd=REPO, capture_output=True, text=True, timeout=60, start_new_session=True)
            assert cancel.returncode == 0 and cancel.stdout.strip() == f"run {name} is not running", cancel
        assert group.poll() is None  # never signalled
    finally:
        group.kill()
        group.wait()


@pytest.mark.slow  # a training run through the real CLI
def test_finished_run_leaves_no_pid(runs_dir: Path) -> None:
    run_cli("launch", "digits", "trainer.max_steps=2", "--run-name", "done", runs_dir=runs_dir, check=True)
    info = json.loads((runs_dir / "done" / "run.json").read_text())
    assert info["state"] == "completed" and info["exit_code"] == 0
    assert not {"pid", "pid_start", "launcher_pid", "launcher_start"} & info.keys()


def test_runs_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_text("")
    for args in (("launch", "digits", "trainer.max_steps=2"), ("status", "x")):
        proc = run_cli(*args, runs_dir=not_a_dir)
        assert proc.returncode == 2 and proc.stderr == f"error: --runs-dir: {not_a_dir} is a file, not a directory\n" \
            "  HINT: choose a directory for the runs\n", proc.stderr
    proc = run_cli("launch", "digits", "trainer.max_steps=2", runs_dir=not_a_dir / "below")
    assert proc.returncode == 2 and "cannot write run directory" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not_a_dir.read_text() == ""


def test_names_too_long_for_the_file_system(tmp_path: Path) -> None:
    too_long = tmp_path / ("r" * 300)  # one path component over NAME_MAX (255)
    proc = run_cli("launch", "digits", "trainer.max_steps=2", runs_dir=too_long)
    assert proc.returncode == 2 and "File name too long" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    deep = tmp_path.joinpath(*["d" * 200] * 20)  # the whole path over PATH_MAX (4096)
    proc = run_cli("launch", "digits", "trainer.max_steps=2", "--run-name", "x" * 100, runs_dir=deep)
    assert proc.returncode == 2 and "File name too long" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_directory_must_stay_inside_the_runs_dir(runs_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (runs_dir / "link").symlink_to(outside)
    proc = run_cli("launch", "digits", "trainer.max_steps=2", "--run-name", "link", runs_dir=runs_dir)
    assert proc.returncode == 2 and "outside the runs directory" in proc.stderr, proc.stderr
    assert list(outside.iterdir()) == []

    _write_run(tmp_path, "victim")
    (runs_dir / "lure").symlink_to(tmp_path / "victim")
    for command in ("status", "cancel"):
        proc = run_cli(command, "lure", runs_dir=runs_dir)
        assert proc.returncode == 2 and "outside the runs directory" in proc.stderr, proc.stderr


def test_relaunch_of_a_queued_slurm_run_is_refused(runs_dir: Path, tmp_path: Path) -> None:
    """A run whose Slurm job is still queued: `launch` and `sbatch` name the job and change nothing.
    `sacct` is a stub that reports the job RUNNING (as `-o JobID,State -P` prints it); `sbatch` a stub
    that fails loudly if reached."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sacct").write_text("#!/bin/sh\necho '4242|RUNNING'\n")
    (stubs / "sbatch").write_text("#!/bin/sh\necho 'sbatch must not run' >&2\nexit 99\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    run_dir = _write_run(runs_dir, "queued", backend="slurm", job_id="4242", job_ids=["4242"], state="submitted")
    before = (run_dir / "run.json").read_text()
    env = {"PATH": f"{stubs}:{os.environ['PATH']}"}
    for command in ("launch", "sbatch"):
        proc = run_cli(command, "digits", "--cluster", "local_slurm", "--run-name", "queued", runs_dir=runs_dir,
                       env=env)
        assert proc.returncode == 2 and "Slurm job 4242" in proc.stderr and "already running" in proc.stderr, \
            proc.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
        assert (run_dir / "run.json").read_text() == before
