"""`launcher stacks` and the doctor's hang rule (issue #24, points 3 and 5): the grouped report from hand-made dumps
in both tools' formats, `jobs.stacks.dump` against real processes (py-spy, faulthandler, a process without the
handler, a dead pid), the doctor reading dump files, and one real 2-rank `launcher run` that hangs on purpose."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml

from conftest import REPO, Background, run_cli, wait_until
from s3_server import free_port
from jobs import stacks
from jobs.stack_report import parse, ranks_named
from launcher.doctor.diagnose import diagnose
from launcher.doctor.hangs import kind_of
from launcher.doctor.records import read_run
from jobs.schema.run_dir import Run

TORCH = "/venv/lib/python3.11/site-packages/torch/distributed"


def py_spy_dump(frames: list[str], pid: int = 7) -> str:
    """A dump as `py-spy dump --full-filenames` prints it, main thread first, then a helper thread."""
    body = "\n".join(f"    {frame}" for frame in frames)
    return (f"Process {pid}: python train.py\nPython v3.11.7 (/usr/bin/python3.11)\n\n"
            f'Thread {pid} (active+gil): "MainThread"\n{body}\n'
            'Thread 99 (idle): "pin_memory"\n    wait (/usr/lib/python3.11/threading.py:327)\n')


BARRIER = [f"barrier ({TORCH}/distributed_c10d.py:4150)", f"wrapper ({TORCH}/c10d_logger.py:81)",
           "<module> (/home/me/train.py:9)"]
SLEEP = ["wait_here (/home/me/train.py:5)", "<module> (/home/me/train.py:8)"]


def test_group_puts_identical_ranks_together_and_names_the_innermost_user_frame() -> None:
    dumps = {0: py_spy_dump(BARRIER, 10), 1: py_spy_dump(SLEEP, 11), 2: py_spy_dump(BARRIER, 12),
             3: py_spy_dump(BARRIER, 13), 4: "no stack: process 5 is not running\n"}
    report = stacks.group(dumps).splitlines()
    # no source here: the library function called from the user's line names it, the user's line says where
    assert report[0] == "ranks 0,2,3: barrier at train.py:9"
    assert report[1:4] == [f"    {frame}" for frame in BARRIER]
    assert "rank 1: wait_here at train.py:5" in report
    assert "rank 4: no stack: process 5 is not running" in report
    assert report.index("rank 1: wait_here at train.py:5") > 3  # the largest group first


def test_the_source_block_names_the_call_and_faulthandler_dumps_parse_the_same() -> None:
    fault = ('Thread 0x00007f01 (most recent call first):\n'
             '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n'
             '\nCurrent thread 0x00007f00 (most recent call first):\n  File "/home/me/my_script.py", line 12 in step\n'
             '  File "/home/me/my_script.py", line 20 in <module>\n\nSource lines:\n'
             "  /home/me/my_script.py:12: time.sleep(3600)  # stuck\n")
    stack = parse(fault)
    assert [f.function for f in stack.main.frames] == ["step", "<module>"]  # the main thread: listed last
    assert stack.label() == "time.sleep at my_script.py:12"
    with_source = py_spy_dump(BARRIER) + "\nSource lines:\n  /home/me/train.py:9: dist.barrier()\n"
    assert stacks.group({0: with_source, 1: with_source}).startswith("ranks 0,1: dist.barrier at train.py:9\n")
    backward = py_spy_dump(["Tensor.backward (/venv/lib/python3.11/site-packages/torch/_tensor.py:623)",
                            "step (/home/me/train.py:96)"])
    backward += "\nSource lines:\n  /home/me/train.py:96: scaler.scale(loss).backward()\n"
    assert parse(backward).label() == "backward at train.py:96"  # the call running, not the line's first


def test_many_ranks_are_named_as_ranges() -> None:
    assert ranks_named([3]) == "rank 3"
    assert ranks_named([0, 2, 3]) == "ranks 0,2,3"
    assert ranks_named([*range(64), 65, 67, 68, 69]) == "ranks 0-63,65,67-69"


def test_node_answers_are_read_from_the_json_lines() -> None:
    out = ('warning: something\n{"host": "n1", "stacks": {"1": "b", "0": "a"}}\n{"host": "n2", "stacks": {"2": "c"}}\n'
           "{not json\n")
    assert stacks.read_answers(out) == {0: "a", 1: "b", 2: "c"}


# ----------------------------------------------------------------------------- real processes
SLEEPER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from jobs import stacks
if sys.argv[2] == "install":
    stacks.install(Path(sys.argv[1]), 3)
print("ready", flush=True)
def wait_here():
    time.sleep(600)  # the known line: 10
wait_here()
"""


@pytest.fixture
def sleeper(tmp_path: Path, request: pytest.FixtureRequest):
    """A Python process sleeping at line 10 of sleeper.py, rank 3 of a run in tmp_path (with the handler
    installed, unless the test is parametrized "bare")."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER.format(repo=str(REPO)))
    mode = getattr(request, "param", "install")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), mode], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("py_spy", [True, False], ids=["py-spy", "faulthandler"])
def test_dump_reads_a_sleeping_process_and_says_a_dead_pid_is_gone(sleeper: subprocess.Popen, tmp_path: Path,
                                                                   py_spy: bool) -> None:
    run = tmp_path / "run"
    assert stacks.local_ranks(run) == {3: sleeper.pid}  # the rank recorded its process at install
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    texts = stacks.dump({3: sleeper.pid, 4: int(dead.stdout)}, tmp_path / "dump", 10, py_spy=py_spy)
    assert texts[3].startswith("Process " if py_spy else "Current thread")  # which tool read it
    assert stacks.group({3: texts[3]}).startswith("rank 3: time.sleep at sleeper.py:10\n")
    assert texts[4] == f"no stack: process {dead.stdout.strip()} is not running\n"
    assert (tmp_path / "dump" / "rank3.txt").read_text() == texts[3]
    assert sleeper.poll() is None


def test_a_py_spy_that_hangs_is_cut_off_and_the_signal_path_answers(sleeper: subprocess.Popen, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """py-spy stuck (ptrace waiting on a process in uninterruptible sleep): dump stays within its time."""
    stuck = tmp_path / "py-spy"
    stuck.write_text("#!/bin/sh\nsleep 60\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(stacks, "_py_spy", lambda: str(stuck))
    began = time.monotonic()
    texts = stacks.dump({3: sleeper.pid}, tmp_path / "dump", 3)
    assert time.monotonic() - began < 4
    assert texts[3].startswith("Current thread ") and "sleeper.py\", line 10" in texts[3]


def test_a_node_dumps_its_own_ranks_and_answers_in_one_json_line(sleeper: subprocess.Popen, tmp_path: Path) -> None:
    """What `launcher stacks` runs on each Slurm node or VM; a record of another host's rank is not this node's."""
    run = tmp_path / "run"
    (run / "ranks" / "rank5.json").write_text(json.dumps({"rank": 5, "pid": sleeper.pid, "host": "elsewhere",
                                                                    "pid_start": stacks.process_start(sleeper.pid)}))
    out = subprocess.run([sys.executable, "-m", "jobs.stacks", "--run-dir", str(run), "--dest", str(tmp_path / "d")],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    answers = stacks.read_answers(out)
    assert list(answers) == [3] and "sleeper.py:10" in answers[3]
    assert (tmp_path / "d" / "rank3.txt").read_text() == answers[3]


@pytest.mark.parametrize("sleeper", ["bare"], indirect=True)
def test_the_fallback_never_signals_a_process_without_the_handler(sleeper: subprocess.Popen, tmp_path: Path) -> None:
    """Its default action would end the process: a rank not started yet (or not a rank) is left alone."""
    texts = stacks.dump({0: sleeper.pid}, tmp_path / "dump", 5, py_spy=False)
    assert "has no stack handler installed" in texts[0]
    assert sleeper.poll() is None


# ----------------------------------------------------------------------------- the doctor
def hung_run(tmp_path: Path, dumps: dict[int, str], state: str = "cancelled") -> Run:
    run = Run.at(tmp_path / "hung")
    folder = run.dir / "logs" / "stacks" / "20261207-143501"
    folder.mkdir(parents=True)
    run.update(run_name="hung", backend="local", state=state)
    for rank, text in dumps.items():
        (folder / f"rank{rank}.txt").write_text(text)
    return run


ALL_REDUCE = [f"all_reduce ({TORCH}/distributed_c10d.py:2501)", "<module> (/home/me/my_script.py:30)"]
SLEEP_SOURCE = "\nSource lines:\n  /home/me/my_script.py:12: time.sleep(3600)\n"


def test_doctor_names_the_stuck_rank_and_what_the_others_wait_in(tmp_path: Path) -> None:
    stuck = py_spy_dump(["<module> (/home/me/my_script.py:12)"]) + SLEEP_SOURCE
    run = hung_run(tmp_path, {0: py_spy_dump(ALL_REDUCE), 1: stuck, 2: py_spy_dump(ALL_REDUCE),
                              3: py_spy_dump(ALL_REDUCE)})
    [found] = [f for f in diagnose(read_run(run)) if f.failure]
    assert found.what == ("rank 1 stuck in time.sleep at my_script.py:12; ranks 0,2,3 waiting in all_reduce at "
                          "my_script.py:30 (a rank that skipped or never reached a collective)")
    assert "the rank sleeps" in found.fix
    assert [line.where for line in found.evidence] == ["logs/stacks/20261207-143501/rank1.txt:5",
                                                       "logs/stacks/20261207-143501/rank0.txt:6"]


def test_doctor_adds_the_collective_the_stuck_rank_never_entered(tmp_path: Path) -> None:
    """The flight recorder's records beside the stacks (jobs.flight_recorder): the ranks that wait entered
    collective #28, the stuck one's newest is #27; a record that is not JSON is left out."""
    stuck = py_spy_dump(["<module> (/home/me/my_script.py:12)"]) + SLEEP_SOURCE
    run = hung_run(tmp_path, {0: py_spy_dump(ALL_REDUCE), 1: stuck, 2: py_spy_dump(ALL_REDUCE)})
    folder = run.dir / "logs" / "stacks" / "20261207-143501"
    for rank, seq in ((0, 28), (1, 27), (2, 28)):
        entries = [{"pg_id": 0, "collective_seq_id": n, "profiling_name": "gloo:all_reduce", "state": "scheduled"}
                   for n in range(seq - 2, seq + 1)]
        (folder / f"flight-rank{rank}.json").write_text(json.dumps({"entries": entries}))
    (folder / "flight-rank3.json").write_text("{not json")
    [found] = [f for f in diagnose(read_run(run)) if f.failure]
    assert found.what.endswith("(a rank that skipped or never reached a collective); the flight recorder: ranks "
                               "0,2 entered collective #28 (gloo:all_reduce), which rank 1 never entered"), found.what


def test_doctor_says_nothing_of_dumps_of_a_run_that_completed(tmp_path: Path) -> None:
    run = hung_run(tmp_path, {0: py_spy_dump(ALL_REDUCE), 1: py_spy_dump(SLEEP)}, state="completed")
    assert not [f for f in diagnose(read_run(run)) if "stuck" in f.what or "wait" in f.what]


LOADER = ["wait (/usr/lib/python3.11/threading.py:331)", "get (/usr/lib/python3.11/queue.py:180)",
          "_try_get_data (/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:1133)",
          "__next__ (/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:631)",
          "<module> (/home/me/train.py:42)"]
MOUNT = ["read_text (/usr/lib/python3.11/pathlib.py:1058)", "load (/home/me/data.py:7)"]


@pytest.mark.parametrize("frames, kind, fix", [
    (LOADER, "data", "data.num_workers=0"), (MOUNT, "io", "the mount it reads or writes"),
    (ALL_REDUCE, "collective", "same collectives in the same order"), (SLEEP, "user", "its own code")])
def test_each_kind_of_hang_gets_its_fix(tmp_path: Path, frames: list[str], kind: str, fix: str) -> None:
    assert kind_of(parse(py_spy_dump(frames))) == kind
    if kind != "collective":  # a stuck rank beside one waiting in a collective: its own kind's fix
        run = hung_run(tmp_path, {0: py_spy_dump(frames), 1: py_spy_dump(ALL_REDUCE)})
        [found] = [f for f in diagnose(read_run(run)) if f.failure]
        assert fix in found.fix and found.what.startswith("rank 0 stuck in ")


def test_stacks_of_a_run_that_is_not_running_is_one_line_and_exit_2(tmp_path: Path) -> None:
    hung_run(tmp_path, {}, state="completed")
    proc = run_cli("stacks", "hung", runs_dir=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: run hung is not running (") and proc.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- real runs
HANG = REPO / "tests" / "stacks_hang.py"  # rank 1 sleeps at line 9, rank 0 waits in the barrier at line 11
SLEEPS, WAITS = "rank 1: time.sleep at stacks_hang.py:9\n", "rank 0: dist.barrier at stacks_hang.py:11\n"


def wait_for_both_ranks(run_dir: Path) -> None:
    wait_until(lambda: all(_logged(run_dir / "logs" / f"rank{r}.log", text) for r, text in
                           ((0, "rank 0 at the barrier"), (1, "rank 1 sleeping"))), "both ranks in place", 180)


def _logged(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


@pytest.mark.slow
def test_stacks_names_both_ranks_of_a_live_local_run(runs_dir: Path) -> None:
    """One 2-rank `launcher run` that hangs on purpose: `launcher stacks` names both lines, read by py-spy and
    (py-spy off) through the faulthandler the script's own process registered; the doctor explains it."""
    run = Background("run", str(HANG), "--procs-per-node", "2", "--cluster", "local", "--run-name", "hang",
                     runs_dir=runs_dir)
    try:
        wait_for_both_ranks(runs_dir / "hang")
        shown = run_cli("stacks", "hang", runs_dir=runs_dir, check=True).stdout
        fallback = run_cli("stacks", "hang", runs_dir=runs_dir, check=True, env={stacks.PY_SPY_ENV: "0"}).stdout
        doctor = run_cli("doctor", "hang", runs_dir=runs_dir).stdout
    finally:
        run_cli("cancel", "hang", runs_dir=runs_dir)
        run.proc.wait(timeout=120)
    for out in (shown, fallback):
        assert SLEEPS in out and WAITS in out, out
    dumps = sorted((runs_dir / "hang" / "logs" / "stacks").glob("*/rank1.txt"), key=lambda p: p.stat().st_mtime)
    assert len(dumps) == 2 and dumps[0].read_text().startswith("Process ")  # py-spy's dump, then faulthandler's
    assert dumps[1].read_text().startswith("Current thread "), dumps[1].read_text()
    assert ("rank 1 stuck in time.sleep at stacks_hang.py:9; rank 0 waiting in dist.barrier at stacks_hang.py:11"
            in doctor), doctor


@pytest.mark.slurm
def test_stacks_reads_the_ranks_of_a_slurm_job(slurm: None, runs_dir: Path) -> None:
    """The same hang as one Slurm job of 2 tasks: `srun --overlap` runs jobs.stacks beside the ranks."""
    run_cli("run", str(HANG), "--procs-per-node", "2", "--cluster", "local_slurm", "--run-name", "hang",
            runs_dir=runs_dir, check=True)
    try:
        wait_for_both_ranks(runs_dir / "hang")
        shown = run_cli("stacks", "hang", runs_dir=runs_dir, check=True).stdout
    finally:
        run_cli("cancel", "hang", runs_dir=runs_dir)
    assert SLEEPS in shown and WAITS in shown, shown


@pytest.mark.slow
def test_stacks_reads_the_ranks_on_vms_over_ssh(vm_hosts: Path, runs_dir: Path) -> None:
    """The same hang on the loopback "VMs" (one host, 2 ranks): `python -m jobs.stacks` runs there over SSH,
    in that host's own copy of the run directory."""
    name = f"hang-{os.getpid()}"  # the hosts keep their folders from one test run to the next
    config = yaml.safe_load((REPO / "cluster_configs" / "local_vms.yaml").read_text())
    config["vms"]["rdzv_port"] = free_port()  # other VM tests may run beside this one, on the same hosts
    cluster = runs_dir.parent / "local_vms.yaml"
    cluster.write_text(yaml.safe_dump(config))
    run_cli("run", str(HANG), "--procs-per-node", "2", "--cluster", str(cluster), "--run-name", name,
            runs_dir=runs_dir, check=True)
    try:
        wait_for_both_ranks(Path(f"/tmp/launcher-vms/hosts/127.0.0.2/runs/{name}"))  # cluster_configs/local_vms.yaml
        shown = run_cli("stacks", name, runs_dir=runs_dir, check=True).stdout
    finally:
        run_cli("cancel", name, runs_dir=runs_dir)
    assert SLEEPS in shown and WAITS in shown, shown


def test_the_nccl_flight_recorder_is_on_and_dumps_into_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank records its last collectives (NCCL only) and a timed-out collective dumps them into the run's
    stacks folder; a user's own setting wins, in the trainer's process and in a script's environment."""
    from jobs import flight_recorder, stacks

    for key in flight_recorder.environment(tmp_path):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")  # the user's
    env = stacks.script_environment(tmp_path, 1)
    assert env["TORCH_FR_BUFFER_SIZE"] == "2000" and env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "logs" / "stacks" / "nccl-trace-rank")
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" not in env
    monkeypatch.setattr(stacks, "STACK_SIGNAL", None)  # install: the environment only, no handler
    stacks.install(tmp_path, 0)
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_FR_DUMP_TEMP_FILE"]
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
