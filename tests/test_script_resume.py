"""A user's own script started again (issue 22, points 1-4): which start it is, whether it continues
earlier progress, resume arguments and `{checkpoint_dir}`, a working directory per run, and the line
that says a restart probably began from scratch. The scripts are the example project's nanoGPT-style
script (resumes only with `--init_from=resume`) and tutorial-style script (resumes from snapshot.pt in
its working directory), on 2 ranks through the real CLI; the decisions themselves are tested without
processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, user_cli, user_env, wait_until
from jobs.schema import from_document, RecipeConfig
from jobs.schema.run_dir import Run
from jobs.schema.script import fill
from jobs.script_start import begin, link_code

EXAMPLE = REPO / "examples" / "project"
NANO = ["--max_iters", "40", "--eval_interval", "10"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return copy


# ----------------------------------------------------------------------------- decisions, no processes
def _recipe(code: Path, **script: object) -> RecipeConfig:
    return from_document(RecipeConfig, {"name": "s", "script": {"path": str(code / "train.py"), **script}}, "test")


def _run(tmp_path: Path, launches: int = 1) -> Run:
    run = Run.at(tmp_path / "runs" / "r")
    run.dir.mkdir(parents=True)
    run.update(launches=launches)
    return run


@pytest.fixture
def code(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    (folder / "data").mkdir(parents=True)
    (folder / "train.py").write_text("")
    (folder / "data" / "input.txt").write_text("text")
    return folder


def _restart(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(count))


def test_a_start_is_decided_once_for_every_rank_and_resumes_only_after_progress(
        tmp_path: Path, code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    run, recipe = _run(tmp_path), _recipe(code, resume_args=["--init_from=resume", "--out={checkpoint_dir}"])
    _restart(monkeypatch, 0)
    first = begin(run, recipe, code)
    assert (first.attempt, first.resuming, first.note) == (1, False, None)
    (first.checkpoint_dir / "ckpt.pt").write_text("x")  # progress, seen only by the next start
    assert begin(run, recipe, code) == first  # rank 1 of the same start: the same answer
    assert first.arguments(run, recipe) == []
    _restart(monkeypatch, 1)  # the job was requeued
    second = begin(run, recipe, code)
    assert (second.attempt, second.resuming, second.note) == (2, True, None)
    assert second.arguments(run, recipe) == ["--init_from=resume", f"--out={run.dir / 'script_checkpoints'}"]
    env = second.environment(run)
    assert env["LAUNCHER_ATTEMPT"] == "2" and env["LAUNCHER_RESUMING"] == "1"
    assert env["LAUNCHER_CHECKPOINT_DIR"] == str(run.dir / "script_checkpoints")
    assert env["LAUNCHER_WORK_DIR"] == str(run.dir / "work") and env["LAUNCHER_RUN_DIR"] == str(run.dir)


def test_a_restart_without_progress_adds_no_resume_arguments_and_says_why(
        tmp_path: Path, code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    run, recipe = _run(tmp_path), _recipe(code, resume_args=["--init_from=resume"])
    _restart(monkeypatch, 0)
    begin(run, recipe, code)
    (run.dir / "work" / "data" / "input.txt").read_text()  # a link to the code's file: not progress
    _restart(monkeypatch, 1)
    again = begin(run, recipe, code)
    assert (again.attempt, again.resuming) == (2, False) and again.arguments(run, recipe) == []
    assert again.note and "resume arguments were not added" in again.note
    (run.dir / "work" / "out").mkdir()
    (run.dir / "work" / "out" / "ckpt.pt").write_text("x")  # a file the script wrote where it works
    _restart(monkeypatch, 2)
    third = begin(run, recipe, code)
    assert (third.attempt, third.resuming, third.note) == (3, True, None)


def test_a_restart_of_a_script_that_cannot_resume_is_told_so_unless_it_uses_the_runtime_api(
        tmp_path: Path, code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    run, recipe = _run(tmp_path), _recipe(code)
    _restart(monkeypatch, 0)
    assert begin(run, recipe, code).note is None
    _restart(monkeypatch, 1)
    note = begin(run, recipe, code).note
    assert note and "neither --resume-args nor the runtime API" in note and "began again from scratch" in note
    run.update(runtime_api=True)  # what jobs.runtime.checkpointer() records
    _restart(monkeypatch, 2)
    assert begin(run, recipe, code).note is None and run.info().restart_note is None


def test_a_relaunch_is_a_new_start_and_workdir_code_works_in_the_code_folder(
        tmp_path: Path, code: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    run, recipe = _run(tmp_path), _recipe(code, workdir="code")
    assert begin(run, recipe, code).workdir == code and not (run.dir / "work").exists()
    (code / "snapshot.pt").write_text("x")  # in the code folder: not the run's progress
    run.update(launches=2)
    again = begin(run, recipe, code)
    assert (again.attempt, again.resuming) == (2, False)


def test_the_work_folder_sees_the_code_and_keeps_what_the_script_writes(tmp_path: Path, code: Path) -> None:
    run_dir = code / "runs" / "r"  # the runs directory inside the code folder, as ./runs is
    work = run_dir / "work"
    run_dir.mkdir(parents=True)
    link_code(work, code, run_dir)
    assert sorted(p.name for p in work.iterdir()) == ["data", "train.py"]  # not runs/: the script's own run
    assert (work / "data" / "input.txt").read_text() == "text"
    (work / "snapshot.pt").write_text("mine")
    other = tmp_path / "code2"
    shutil.copytree(code / "data", other / "data")
    (other / "snapshot.pt").write_text("theirs")
    link_code(work, other, run_dir)  # relaunched from another checkout
    assert os.readlink(work / "data") == str(other / "data")  # pointed at the new code folder
    assert (work / "snapshot.pt").read_text() == "mine"  # the script's file wins over the code's
    assert not os.path.lexists(work / "train.py")  # the old folder's link to what the new one lacks: gone
    link_code(work, other, run_dir)  # again (every rank calls it): nothing changes
    assert sorted(p.name for p in work.iterdir()) == ["data", "snapshot.pt"]


def test_placeholders_are_filled_and_other_braces_kept() -> None:
    folders = {"{run_dir}": "/r", "{checkpoint_dir}": "/r/c"}
    assert fill("--out_dir={checkpoint_dir}", folders) == "--out_dir=/r/c"
    assert fill('{"a": 1} {run_dir}/x {run} {checkpoint_dir', folders) == '{"a": 1} /r/x {run} {checkpoint_dir'


# ----------------------------------------------------------------------------- the command line
def test_resume_args_and_workdir_from_the_command_line(project: Path) -> None:
    # --sbatch prints the job script without submitting it: the run directory is written, nothing runs
    shown = user_cli(project, "run", "nanogpt_style.py", "--cluster", "local_slurm", "--sbatch", "--resume-args",
                     "--init_from=resume --x 'a b'", "--workdir", "code", "--run-name", "cl", "--",
                     "--out_dir={checkpoint_dir}")
    assert shown.returncode == 0, shown.stderr
    config = (project / "runs" / "cl" / "config.yaml").read_text()
    assert "- --init_from=resume\n" in config and "- --x\n" in config and "- a b\n" in config, config
    assert "workdir: code" in config and "- --out_dir={checkpoint_dir}\n" in config, config


@pytest.mark.parametrize("argv, says", [
    (["--resume-args", "--init_from='resume"], "--resume-args \"--init_from='resume\": No closing quotation"),
    (["script.workdir=somewhere"], "script.workdir"),
])
def test_bad_resume_input_is_one_line_and_writes_nothing(project: Path, argv: list[str], says: str) -> None:
    proc = user_cli(project, "run", "nanogpt_style.py", *argv, "--run-name", "bad")
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not (project / "runs").exists()


# ----------------------------------------------------------------------------- real runs, 2 ranks
def _final(path: Path) -> dict:
    return json.loads(path.read_text())


def _start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=project, env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_nanogpt_style_script_cancelled_and_relaunched_resumes_with_one_flag(project: Path) -> None:
    """`--resume-args '--init_from=resume'` with `--out_dir={checkpoint_dir}`: stopped after its
    iteration-10 checkpoint, relaunched under the same name, it continues from ckpt.pt and ends with the
    weights of a run that went straight through."""
    run = ["run", "nanogpt_style.py", "--procs-per-node", "2", "--resume-args", "--init_from=resume"]
    straight = user_cli(project, *run, "--run-name", "straight", "--", "--out_dir={checkpoint_dir}", *NANO)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "with --init_from=resume" not in straight.stdout  # a first start gets no resume arguments
    cut = _start(project, *run, "--run-name", "cut", "--", "--out_dir={checkpoint_dir}", *NANO,
                 "--iter_sleep", "0.2")
    ckpt = project / "runs" / "cut" / "script_checkpoints" / "ckpt.pt"
    try:
        wait_until(lambda: ckpt.exists(), "the first ckpt.pt", timeout=120)
    finally:
        user_cli(project, "cancel", "cut")
        out = cut.communicate(timeout=120)[0]
    assert not (ckpt.parent / "final.json").exists(), out  # it was stopped before the end
    again = user_cli(project, *run, "--run-name", "cut", "--", "--out_dir={checkpoint_dir}", *NANO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[rank0] resuming from iter " in again.stdout and "[rank1] resuming from iter " in again.stdout
    log = (project / "runs" / "cut" / "logs" / "rank0.log").read_text()
    assert "start 2: continues earlier progress, with --init_from=resume" in log, log
    assert _final(ckpt.parent / "final.json") == _final(project / "runs" / "straight" / "script_checkpoints" /
                                                         "final.json")
    status = user_cli(project, "status", "cut").stdout
    assert "script_start: 2 (resumed earlier progress)" in status and "warning" not in status, status


@pytest.mark.slow
def test_a_tutorial_style_script_keeps_its_snapshot_in_its_own_run(project: Path) -> None:
    """The DDP tutorial's snapshot.pt lands in each run's work/ folder, never in the shared code folder:
    a second run starts fresh, a relaunch of the first finds its snapshot; the restart is flagged."""
    run = ["run", "tutorial_style.py", "--procs-per-node", "2"]
    first = user_cli(project, *run, "--run-name", "a", "--", "--total_epochs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    other = user_cli(project, *run, "--run-name", "b", "--", "--total_epochs", "1")
    assert other.returncode == 0 and "Loading snapshot" not in other.stdout, other.stdout
    assert not (project / "snapshot.pt").exists()
    assert (project / "runs" / "a" / "work" / "snapshot.pt").exists()
    again = user_cli(project, *run, "--run-name", "a", "--", "--total_epochs", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Resuming training from snapshot at Epoch 2" in again.stdout, again.stdout
    status = user_cli(project, "status", "a").stdout
    assert "warning: start 2: the script uses neither --resume-args nor the runtime API" in status, status
    assert "--resume-args" in (project / "runs" / "a" / "logs" / "rank0.log").read_text()
