"""The hang watchdog and restarts inside the allocation (jobs.watchdog, the local supervisor).

Pure: the timeout rule, the budgets, the settings' validation, the watchdog on progress files with a fake
clock. Real processes: one 2-rank local run whose rank 1 hangs inside a step on its first attempt and raises
inside a step on its second (tests/faulty_data.py): both are caught and restarted in place from the newest
checkpoint, and the run ends with weights bit-equal to an uninterrupted one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, final_params, run_cli
from jobs.flight_recorder import last_collective
from jobs.progress import ProgressWriter, Report
from jobs.schema import load_cluster, load_recipe
from jobs.schema.resilience import ResilienceConfig, hang_timeout
from launcher.backends import local
from launcher.cli import main
from launcher.runs import prepare_run
from jobs.watchdog import Watchdog, budget_left, descendants, rank_processes, restart_in_place


def test_the_default_timeout_is_300_s_or_20_slowest_steps() -> None:
    assert hang_timeout(None, 0.0) == 300  # before any step: a first step that compiles is not a hang
    assert hang_timeout(None, 10.0) == 300
    assert hang_timeout(None, 20.0) == 400
    assert hang_timeout(7.0, 100.0) == 7  # a setting wins over the measurement


def test_each_kind_has_its_own_budget() -> None:
    cfg = ResilienceConfig(max_hang_restarts=2, max_crash_restarts=0)
    assert budget_left(cfg, {}, "hangs") == (True, 2)
    assert budget_left(cfg, {"hangs": 1, "crashes": 5}, "hangs") == (True, 2)
    assert budget_left(cfg, {"hangs": 2}, "hangs") == (False, 2)
    assert budget_left(cfg, {}, "crashes") == (False, 0)  # crashes restart only when asked for


@pytest.mark.parametrize("override, said", [
    ("resilience.hang_timeout_s=0", "resilience.hang_timeout_s: 0.0 must be > 0"),
    ("resilience.hang_timeout_s=-5", "resilience.hang_timeout_s: -5.0 must be > 0"),
    ("resilience.max_hang_restarts=-1", "resilience.max_hang_restarts: -1 must be >= 0"),
    ("resilience.max_crash_restarts=-2", "resilience.max_crash_restarts: -2 must be >= 0"),
    ("resilience.hang_timeout_s=soon", "resilience.hang_timeout_s"),
    ("resilience.max_hang_restart=1", "max_hang_restart"),  # a typo: refused, the valid keys listed
])
def test_a_bad_setting_is_one_line_and_exit_2(override: str, said: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["show", "digits", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "digits.yaml" in err and said in err, err
    assert "Traceback" not in err


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_hang_is_no_progress_on_any_live_rank(tmp_path: Path) -> None:
    """Rank 1 stops at step 5; rank 0 steps on until 10 (then waits for rank 1 in a collective): the
    hang is 10 s after rank 0's last step, naming both ranks and their steps."""
    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    writers = [ProgressWriter(run.progress_file(r)).started() for r in (0, 1)]
    clock = Clock()
    dog = Watchdog(run, 2, 10.0, clock=clock)
    found = {}
    for second in range(25):
        if second <= 10:
            writers[0].beat(second)
        if second <= 5:
            writers[1].beat(second)
        found[second] = dog.check()
        clock.now += 1
    assert [s for s, hang in found.items() if hang is not None] == list(range(20, 25))
    hang = found[20]
    assert hang is not None and hang.ranks == (0, 1) and hang.timeout_s == 10 and hang.steps == {0: 10, 1: 5}
    assert "on ranks 0, 1 (rank 0 at step 10, rank 1 at step 5)" in hang.line()
    assert dog.pids() == {0: os.getpid(), 1: os.getpid()}


def test_a_rank_that_never_reported_is_found_by_its_environment() -> None:
    """A rank stuck before its first report (an import on a dead mount) is still dumped: its pid comes
    from the RANK in the environment of the processes below the supervisor's child."""
    code = "import subprocess, sys, os; subprocess.run(['sleep', '30'], env={**os.environ, 'RANK': '1'})"
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 10
        while time.time() < deadline and 1 not in rank_processes(root.pid):
            time.sleep(0.05)
        found = rank_processes(root.pid)
        assert found[0] == root.pid and found[1] in descendants(root.pid)
        assert Path(f"/proc/{found[1]}/cmdline").read_bytes().startswith(b"sleep")
    finally:
        for pid in [*descendants(root.pid), root.pid]:
            os.kill(pid, 9)
        root.wait()


def test_the_default_follows_the_slowest_step_and_ended_ranks_are_not_hung(tmp_path: Path) -> None:
    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    sleeping = subprocess.Popen(["sleep", "60"])  # a plain script that reports no steps and uses no CPU
    try:
        ProgressWriter(run.progress_file(0), ended.pid).started()  # a rank that finished: never a hang
        ProgressWriter(run.progress_file(1), sleeping.pid).started()
        clock = Clock()
        dog = Watchdog(run, 2, None, clock=clock)
        assert dog.check() is None and dog.timeout() == 300
        clock.now += 299
        assert dog.check() is None
        clock.now += 1
        hang = dog.check()
        assert hang is not None and hang.ranks == (1,)  # rank 0's process has ended
        assert Report.read(run.progress_file(1)) == Report(sleeping.pid, 0, None, 0.0, socket.gethostname())
        (run.dir / "logs").mkdir(exist_ok=True)
        (run.dir / "logs" / "rank1.log").write_text("a line\n")  # its output grew: progress
        assert dog.check() is None
    finally:
        sleeping.kill()
        sleeping.wait()


def test_past_its_budget_a_run_stops_and_status_says_why(tmp_path: Path) -> None:
    recipe = load_recipe("digits", ["resilience.max_crash_restarts=1"])
    run = prepare_run(recipe, load_cluster("local"), "r", tmp_path, "auto")
    assert restart_in_place(run, recipe.resilient, "crashes", "rank 1 exited with code 1")
    assert run.info().inplace_restarts == {"crashes": 1} and run.info().resume == "auto"
    assert not restart_in_place(run, recipe.resilient, "crashes", "rank 1 exited with code 1")
    shown = local.status(run)
    assert shown["restarts"] == "crashes 1"
    assert shown["stop_reason"] == ("not restarted: crashes limit of 1 reached (resilience.max_crash_restarts); "
                                    "last: rank 1 exited with code 1")
    log = (run.dir / "logs" / "rank0.log").read_text()
    assert "restarting every rank in place" in log and "crashed; not restarted" in log


# ----------------------------------------------------------------------------- real processes
STEPS = ["trainer.max_steps=12", "checkpoint.every_steps=4", "checkpoint.best_metric=null", "logging.log_every=1",
         "logging.progress_bar=false", "data.target=faulty_data:digits", "data.kwargs.rank=1",
         f"code_dir={REPO / 'tests'}"]
HANG_S = 5.0


@pytest.mark.slow
def test_a_hang_and_a_crash_restart_in_place_and_end_bit_equal(runs_dir: Path) -> None:
    """Rank 1 hangs in step 7 (sample 197 of the attempt), then after the restart from step 4 raises in
    step 8 (sample 100): two restarts in one launch, each counted by kind, and the weights of an
    uninterrupted run."""
    marker = runs_dir / "fired"
    faulty = [*STEPS, "data.kwargs.faults=hang@197,raise@100", f"data.kwargs.marker={marker}",
              f"resilience.hang_timeout_s={HANG_S}", "resilience.max_hang_restarts=1",
              "resilience.max_crash_restarts=1"]
    started = time.time()
    out = run_cli("launch", "digits", *faulty, "--run-name", "faulty", runs_dir=runs_dir, timeout=300)
    took = time.time() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = runs_dir / "faulty"
    log = (run_dir / "logs" / "rank0.log").read_text()
    stacks = run_dir / "logs" / "stacks" / "hang-1"
    texts = {p.name: p.read_text() for p in stacks.iterdir()}
    assert {"rank0.txt", "rank1.txt"} <= set(texts), texts
    # each rank's last collectives beside its stack: rank 0 entered one that rank 1, stuck loading, never did
    newest = {r: last_collective(json.loads(texts[f"flight-rank{r}.json"])) for r in (0, 1)}
    assert newest[0][0] > newest[1][0], newest
    hang_line = next(line for line in log.splitlines() if "hang: no progress" in line)
    # rank 1 sleeps in its data loader, rank 0 waits for it in the gradients' all-reduce: both stall
    assert "on ranks 0, 1" in hang_line and f"timeout {HANG_S:.0f} s" in hang_line, hang_line
    # the hung frame, in whichever format the dumper writes (py-spy's, or jobs.stacks' path:line: code)
    assert "faulty_data.py" in texts["rank1.txt"] or "no stack dumper" in texts["rank1.txt"], texts["rank1.txt"]
    detected = stacks.stat().st_mtime - float(Path(f"{marker}.hang").read_text())
    print(f"launch with a hang and a crash: {took:.1f} s; hang detected {detected:.1f} s after it began "
          f"(timeout {HANG_S} s); {hang_line}")
    assert HANG_S <= detected <= HANG_S + 5, detected
    assert "restarting every rank in place from checkpoint step-4 (hangs 1/1)" in log, log[-3000:]
    assert "crashed (a rank exited with code 1); restarting every rank in place" in log, log[-3000:]
    assert "(crashes 1/1)" in log and "rank failed: ValueError" not in log
    status = run_cli("status", "faulty", runs_dir=runs_dir, check=True).stdout
    assert "state: completed" in status and "restarts: hangs 1, crashes 1" in status, status

    ref = run_cli("launch", "digits", *STEPS, "--run-name", "ref", runs_dir=runs_dir, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    got, want = final_params(run_dir), final_params(runs_dir / "ref")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "the restarted run's weights differ"


def test_a_scripts_step_call_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.should_stop() is a script's step: each call is a beat in its rank's progress file."""
    from jobs import runtime

    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    monkeypatch.setenv("LAUNCHER_RUN_DIR", str(run.dir))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(runtime, "_progress", None)
    for _ in range(3):
        assert runtime.should_stop() is False
    report = Report.read(run.progress_file(3))
    assert report is not None and report.pid == os.getpid() and report.beats == 3 and report.step == 3


def test_a_crash_without_a_budget_fails_the_run_as_before(tmp_path: Path) -> None:
    """max_crash_restarts=0 (the default): no restart, and no stop reason beside the failure."""
    recipe = load_recipe("digits")
    run = prepare_run(recipe, load_cluster("local"), "r", tmp_path, "auto")
    assert not restart_in_place(run, recipe.resilient, "crashes", "a rank exited with code 1")
    assert run.info().inplace_stop is None and "stop_reason" not in local.status(run)
    assert not (run.dir / "logs" / "rank0.log").exists()
