"""Hangs and restarts in place on VMs (launcher.vms.supervise, launcher.vms.restarts, the node agent's
jobs.watchdog.NodeWatchdog).

Pure: when the run hangs from the nodes' reports, how a launch ended, what the supervisor does next and what
`status` shows. Real processes: one 2-node run on the loopback VMs whose rank 1 hangs once inside a step: every
node dumps its ranks' stacks, the supervisor restarts both node agents on the same hosts from the newest
checkpoint in S3, and the run ends with the weights of an uninterrupted one."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from conftest import REPO, run_cli
from jobs.progress import ProgressWriter
from jobs.schema import load_cluster, load_recipe
from jobs.watchdog import Hang, NodeWatchdog
from launcher.backends import vms as vms_backend
from launcher.runs import prepare_run
from launcher.vms import supervise
from launcher.vms.restarts import Stalls, hang_of, verdict
from launcher.vms.supervise import END, RELAUNCH, RESTART, NodeEnd, Supervisor
from s3_server import S3Server, s3_server_fixture

s3_server = pytest.fixture(scope="module")(s3_server_fixture)


def stalled(ranks: dict[int, int], stalled_s: float = 9.0, timeout_s: float = 8.0) -> dict[str, Any]:
    """A node agent's `stalled` event, as JSON brings it (ranks as strings)."""
    return {"event": "stalled", "ranks": list(ranks), "stalled_s": stalled_s, "timeout_s": timeout_s,
            "steps": {str(r): s for r, s in ranks.items()}}


# ----------------------------------------------------------------------------- when the run hangs
def test_the_run_hangs_only_once_every_live_node_is_stalled() -> None:
    stalls = Stalls()
    stalls.report("a", stalled({0: 14}, stalled_s=12.0, timeout_s=8.0))
    assert stalls.hang(["a", "b"]) is None  # node b's ranks still compute: no hang, whatever a says
    stalls.report("b", stalled({1: 13}, stalled_s=8.5, timeout_s=10.0))
    hang = stalls.hang(["a", "b"])
    assert hang is not None and hang.ranks == (0, 1) and hang.steps == {0: 14, 1: 13}
    # every node has stalled for at least the shortest stall; the longest timeout is the run's
    assert hang.stalled_s == 8.5 and hang.timeout_s == 10.0
    stalls.report("a", {"event": "progress"})  # a's ranks moved again: no hang
    assert stalls.hang(["a", "b"]) is None
    assert stalls.hang(["b"]) is not None  # a node whose agent has ended is not waited for
    assert stalls.hang([]) is None  # no node left: nothing hangs


def test_a_stalled_event_reads_back_as_the_hang_it_describes() -> None:
    hang = hang_of(stalled({2: None, 3: 7}))
    assert hang == Hang((2, 3), 9.0, 8.0, {2: None, 3: 7})
    assert "rank 2: no step reported, rank 3 at step 7" in hang.line()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_node_watches_only_its_own_ranks(tmp_path: Path) -> None:
    """Node 1 of a 4-rank run holds the progress files of ranks 2 and 3 only: its hang names those two, and a
    rank of another node (no file here, no process) is never taken for one that is starting."""
    run = prepare_run(load_recipe("digits"), load_cluster("local"), "r", tmp_path, "auto")
    writers = {r: ProgressWriter(run.progress_file(r)).started() for r in (2, 3)}
    clock = Clock()
    dog = NodeWatchdog(run, 5.0, root=0, clock=clock)
    found = []
    for second in range(12):
        if second <= 3:
            for rank, writer in writers.items():
                writer.beat(second)
        found.append(dog.check())
        clock.now += 1
    assert [s for s, hang in enumerate(found) if hang] == [8, 9, 10, 11]
    assert found[8] is not None and found[8].ranks == (2, 3) and found[8].steps == {2: 3, 3: 3}


# ----------------------------------------------------------------------------- how a launch ended
def end(host: str, code: Optional[int] = 1, error: str = "", notice: Optional[dict] = None) -> SimpleNamespace:
    return SimpleNamespace(host=host, code=code, error=error, notice=notice)


HANG = Hang((0, 1), 8.0, 8.0, {0: 14, 1: 14})


@pytest.mark.parametrize("ends, hang, result, want", [
    ([end("a"), end("b")], HANG, None, "hangs"),
    ([end("a"), end("b")], None, None, "crashes"),  # an agent exited non-zero over a live session
    ([end("a", None, "lost the SSH session to a"), end("b")], HANG, None, "failures"),  # the VM may be gone
    ([end("a"), end("b", notice={"kind": "preemption"})], None, None, "preemptions"),
    ([end("a", 0), end("b", 0)], None, {"outcome": "completed"}, "completed"),
    ([end("a", 0), end("b", 0)], None, {"outcome": "preempted", "signal": "SIGTERM"}, "stopped"),
])
def test_how_a_launch_ended(ends: list, hang: Optional[Hang], result: Optional[dict], want: str) -> None:
    assert verdict(ends, cancelled=False, result=result, hang=hang)[0] == want
    assert verdict(ends, cancelled=True, result=result, hang=hang)[0] == "cancelled"


def test_a_crash_names_the_first_node_that_failed() -> None:
    assert verdict([end("b", 1), end("a", 1)], cancelled=False, result=None, hang=None) == \
        ("crashes", "node b: exit code 1")


# ----------------------------------------------------------------------------- what the supervisor does next
def vm_run(tmp_path: Path, *overrides: str) -> Any:
    return prepare_run(load_recipe("digits", list(overrides)), load_cluster("local_vms"), "r", tmp_path, "auto")


def test_a_hang_restarts_in_place_until_its_budget_then_the_run_stops(tmp_path: Path) -> None:
    run = vm_run(tmp_path, "resilience.max_hang_restarts=1")
    sup = Supervisor(run, "127.0.0.2")
    ends = [NodeEnd("127.0.0.2", 1, [0]), NodeEnd("127.0.0.3", 1, [1])]
    sup.attempt, sup.hang, sup.stacks = 1, HANG, {1: "Faulty.__getitem__ (faulty_data.py:45)\n"}
    assert sup.decide(ends) == RESTART
    info = run.info()
    assert info.inplace_restarts == {"hangs": 1} and info.state == "restarting" and not info.requeues
    assert (run.stacks_dir(1) / "rank1.txt").read_text().startswith("Faulty.__getitem__")  # node 1's, on node 0
    asyncio.run(sup.forward_notes(ends))  # rank 0 ran on node 0: its log there
    log = (run.dir / "logs" / "rank0.log").read_text()
    assert "hang: no progress for 8 s (timeout 8 s) on ranks 0, 1" in log
    assert "stacks of every rank in logs/stacks/hang-1/ on node 0 (127.0.0.2)" in log
    assert "restarting every rank in place from the newest committed checkpoint, if any (hangs 1/1)" in log
    assert log.index("hang: no progress") < log.index("restarting every rank") and not sup.notes

    sup.attempt = 2
    assert sup.decide(ends) == END
    info = run.info()
    assert info.state == "failed" and info.inplace_stop.startswith(
        "not restarted: hangs limit of 1 reached (resilience.max_hang_restarts); last: no progress for 8 s")


def test_the_notes_go_to_the_host_that_ran_rank_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`launcher logs` reads rank 0's log from the host that wrote it last: the restart's lines go there,
    not into a copy on node 0 that would hide the rank's own lines; node 0 keeps them if that host fails."""
    run = vm_run(tmp_path, "resilience.max_crash_restarts=1")
    sup = Supervisor(run, "127.0.0.2")
    sent: list[tuple[str, str, str]] = []

    async def remote(spec: Any, command: str, input: str = "", timeout: float = 0) -> Any:
        sent.append((spec.address, command, input))
        return SimpleNamespace(ok=len(sent) == 1)  # the first answer works, the second fails

    monkeypatch.setattr(supervise, "run_remote", remote)
    ends = [NodeEnd("127.0.0.3", 1, [0]), NodeEnd("127.0.0.2", 1, [1])]
    for _ in range(2):
        assert sup.decide(ends) in (RESTART, END)
        asyncio.run(sup.forward_notes(ends))
    assert [(host, command.endswith("/runs/r/logs/rank0.log")) for host, command, _ in sent] == \
        [("127.0.0.3", True), ("127.0.0.3", True)]
    assert "restarting every rank in place" in sent[0][2] and sent[0][2].startswith("launcher: ")
    log = (run.dir / "logs" / "rank0.log").read_text()
    assert "restarting every rank in place" not in log and "crashes limit of 1 reached" in log


def test_a_crash_without_a_budget_is_a_failure_relaunched_as_before(tmp_path: Path) -> None:
    run = vm_run(tmp_path)
    sup = Supervisor(run, "127.0.0.2")
    assert sup.decide([NodeEnd("127.0.0.3", 1, [1]), NodeEnd("127.0.0.2", 1, [0])]) == RELAUNCH
    info = run.info()
    assert info.requeues == {"failures": 1} and info.last_requeue == "node 127.0.0.3: exit code 1"
    assert not info.inplace_restarts and info.inplace_stop is None


def test_a_crash_with_a_budget_restarts_in_place(tmp_path: Path) -> None:
    run = vm_run(tmp_path, "resilience.max_crash_restarts=1")
    sup = Supervisor(run, "127.0.0.2")
    assert sup.decide([NodeEnd("127.0.0.3", 1, [1]), NodeEnd("127.0.0.2", 1, [0])]) == RESTART
    assert run.info().inplace_restarts == {"crashes": 1} and not run.info().requeues


def test_vms_status_shows_restarts_and_why_they_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = vm_run(tmp_path)
    run.update(vm_head="127.0.0.2", vm_run_dir="/x")
    there = {"state": "failed", "inplace_restarts": {"hangs": 2},
             "inplace_stop": "not restarted: hangs limit of 2 reached (resilience.max_hang_restarts); last: x"}
    monkeypatch.setattr(vms_backend, "_remote", lambda run, what: {"info": there, "supervisor": None})
    shown = vms_backend.status(run)
    assert shown["state"] == "failed" and shown["restarts"] == "hangs 2"
    assert shown["stop_reason"].startswith("not restarted: hangs limit of 2")


# ----------------------------------------------------------------------------- real processes
HANG_S = 8.0  # above a checkpoint's save (the watchdog counts only steps once a rank has reported one)


@pytest.mark.slow
def test_a_hang_on_two_vms_restarts_in_place_and_ends_bit_equal(tmp_path: Path, vm_hosts: Path,
                                                                  s3_server: S3Server) -> None:
    """Rank 1 sleeps for ever in its data loader during step 15 (sample 453 of its process): both nodes stall,
    each dumps its rank's stack, the supervisor kills and restarts both agents on the same hosts (no relaunch,
    nothing copied), the ranks resume from step 10 in S3. Then rank 1 raises in step 14 (sample 100 after the
    restart): a crash, restarted in place the same way. The run ends bit-equal to an uninterrupted one."""
    from test_vms_runs import DIGITS, HOSTS, TWO_NODES, assert_bit_equal, cli, exported, head_info, launch, \
        vm_cluster, wait_state

    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(REPO / "tests" / "faulty_data.py", user)
    marker = tmp_path / "fired"
    data = ["data.target=faulty_data:digits", "data.kwargs.rank=1", f"code_dir={user}", "checkpoint.best_metric=null"]
    s3_server.create_bucket("vmhang")
    cluster, runs = vm_cluster(tmp_path, vm_hosts, s3_server), tmp_path / "runs"
    launch(cluster, runs, "hang", *TWO_NODES, *data, "checkpoint.uri=s3://vmhang/runs",
           "data.kwargs.faults=hang@453,raise@100", f"data.kwargs.marker={marker}",
           f"resilience.hang_timeout_s={HANG_S}", "resilience.max_hang_restarts=1", "resilience.max_crash_restarts=1")
    final = wait_state(cluster, runs, "hang", timeout=400)
    info = head_info(tmp_path, "hang")
    assert final["state"] == "completed", (final, info)
    assert final["restarts"] == "hangs 1, crashes 1" and "stop_reason" not in final, final
    assert info["vm_launches"] == 1 and not info.get("requeues"), info  # restarted in place, never relaunched

    stacks = tmp_path / "hosts" / HOSTS[0] / "runs" / "hang" / "logs" / "stacks" / "hang-1"
    texts = {p.name: p.read_text() for p in stacks.iterdir()}
    assert {"rank0.txt", "rank1.txt"} <= set(texts), texts  # node 1's rank too, on node 0
    assert "flight-rank0.json" in texts  # node 0's rank answered with its last collectives
    assert "faulty_data.py" in texts["rank1.txt"], texts["rank1.txt"]
    detected = stacks.stat().st_mtime - float(Path(f"{marker}.hang").read_text())
    logs = cli(cluster, runs, "logs", "hang").stdout  # from whichever host ran rank 0 last
    hang_line = next(line for line in logs.splitlines() if "hang: no progress" in line)
    print(f"status: {final}\nhang detected {detected:.1f} s after it began (timeout {HANG_S} s)\n" + "\n".join(
        line for line in logs.splitlines() if line.startswith("launcher:") or "resumed from" in line))
    assert HANG_S <= detected <= HANG_S + 15, detected
    assert "on ranks 0, 1" in hang_line and "stacks of every rank in logs/stacks/hang-1/ on node 0" in hang_line
    assert "restarting every rank in place from checkpoint step-10 (hangs 1/1)" in logs, logs[-3000:]
    assert "crashed (node 127.0.0.3: exit code 1); restarting every rank in place" in logs, logs[-3000:]
    assert "(crashes 1/1)" in logs
    assert "resumed from s3://vmhang/runs/hang/step-" in logs

    ref = tmp_path / "ref"
    run_cli("launch", "digits", *DIGITS, *data, "trainer.micro_batch=32", "parallel.procs_per_node=2",
            "--run-name", "s", runs_dir=ref, check=True)
    import torch

    assert_bit_equal(exported(cluster, runs, "hang", tmp_path / "hang.pt"),
                     torch.load(ref / "s" / "model.pt", weights_only=True))
    assert json.loads((runs / "hang" / "result.json").read_text())["step"] == 40
