"""`launcher run SCRIPT` on this machine (issue 9, point 2): plain torchrun-style scripts that know
nothing of the launcher, run on 2 real ranks (torchrun, gloo).

Every script is written into the test's own directory, which is not on the launcher's import path,
and `launcher run` is started from there, as a user would start it from their project."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_result, user_cli, user_env, wait_until

# A torchrun script: env:// rendezvous, one all_reduce, then one line with what it was given.
DDP_SCRIPT = '''\
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
seen = {key: os.environ.get(key) for key in keys}
print("REPORT " + json.dumps({**seen, "sum": total.item(), "argv": sys.argv[1:], "cwd": os.getcwd()}), flush=True)
dist.barrier()  # as torchrun scripts should: gloo can abort a group destroyed while a peer is mid-collective
dist.destroy_process_group()
'''

# Exits 3 on rank 1 at once; rank 0 waits in a collective that rank 1 never joins.
FAILING_SCRIPT = '''\
import os, sys
import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print("rank 1 gives up", flush=True)
    sys.exit(3)
dist.barrier()
print("rank 0 passed the barrier", flush=True)
'''

# Rank 0 completes; rank 1 fails with 3 only once rank 0 has written the run's result.
LATE_FAILURE_SCRIPT = '''\
import os, sys, time

if os.environ["RANK"] == "1":
    result = os.path.join(os.environ["LAUNCHER_RUN_DIR"], "result.json")
    while not os.path.exists(result):
        time.sleep(0.05)
    print("rank 1 fails after rank 0 completed", flush=True)
    sys.exit(3)
print("rank 0 done", flush=True)
'''

# No runtime API: its own SIGTERM handler notes each SIGTERM; it runs until told to stop.
SIGTERM_SCRIPT = '''\
import os, signal, sys, time

marker = sys.argv[1] + "." + os.environ["RANK"]
received = []

def on_term(signum, frame):
    received.append(signum)
    time.sleep(0.5)  # its own cleanup: a second SIGTERM now would run this handler again
    with open(marker, "w") as f:
        f.write(f"{len(received)} SIGTERM\\n")

signal.signal(signal.SIGTERM, on_term)
print("waiting for SIGTERM", flush=True)
while not received:
    time.sleep(0.05)
time.sleep(2)  # a second SIGTERM, if one comes, is counted in the marker
print(f"stopping after {len(received)} SIGTERM", flush=True)
sys.exit(0)
'''

# Waits for a kill; its line carries torch's own prefix, as torch's logs and tracebacks on a rank do.
KILLABLE_SCRIPT = '''\
import os, time

print(f"[rank{os.environ['RANK']}]: pid {os.getpid()} wrapper {os.getppid()}", flush=True)
time.sleep(120)
'''

MODULE = '''\
import json, os, sys
import torch.distributed as dist

from mypkg.helper import GREETING  # a sibling module of the package: code_dir is on the import path

dist.init_process_group("gloo")  # as under `torchrun --nproc-per-node 1`: env:// needs its variables
dist.destroy_process_group()
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]
print("REPORT " + json.dumps({"greeting": GREETING, "name": __name__, "argv": sys.argv[1:],
                              **{key: os.environ.get(key) for key in keys}}), flush=True)
'''


def reports(log: str) -> list[dict]:
    return [json.loads(line.split("REPORT ", 1)[1]) for line in log.splitlines() if "REPORT " in line]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    (folder / "mypkg").mkdir(parents=True)
    (folder / "ddp.py").write_text(DDP_SCRIPT)
    (folder / "fail.py").write_text(FAILING_SCRIPT)
    (folder / "sigterm.py").write_text(SIGTERM_SCRIPT)
    (folder / "late.py").write_text(LATE_FAILURE_SCRIPT)
    (folder / "killable.py").write_text(KILLABLE_SCRIPT)
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "helper.py").write_text("GREETING = 'hello from mypkg'\n")
    (folder / "mypkg" / "train.py").write_text(MODULE)
    return folder


@pytest.mark.slow
def test_plain_ddp_script_runs_on_two_ranks_with_its_own_logs_and_args(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--lr", "0.5", "--note", "two words", "--", "--looks-like-ours", "--run-name", "x=1"]
    proc = user_cli(project, "run", "ddp.py", "--procs-per-node", "2", "--run-name", "ddp", "--runs-dir", str(runs),
                    "--", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / "ddp"
    for rank in (0, 1):
        seen = reports((run_dir / "logs" / f"rank{rank}.log").read_text())
        assert len(seen) == 1, f"rank{rank}.log holds {len(seen)} reports: each rank's own line only"
        assert seen[0]["RANK"] == str(rank) and seen[0]["LOCAL_RANK"] == str(rank)
        assert seen[0]["WORLD_SIZE"] == "2" and seen[0]["LOCAL_WORLD_SIZE"] == "2"
        assert seen[0]["sum"] == 3.0  # 1 + 2: the two ranks met in one process group
        assert seen[0]["argv"] == args  # untouched: spaces, '--', an option of `launcher run` itself
        assert seen[0]["cwd"] == str(run_dir / "work")  # the run's own working directory (script.workdir: run)
    ports = {r["MASTER_PORT"] for r in reports(proc.stdout)}
    assert len(ports) == 1 and len(reports(proc.stdout)) == 2  # both ranks on the console, one rendezvous
    assert read_result(run_dir)["outcome"] == "completed"
    one = user_cli(project, "logs", "ddp", "--rank", "1", "--runs-dir", str(runs))
    assert one.returncode == 0 and [r["RANK"] for r in reports(one.stdout)] == ["1"], one.stdout


@pytest.mark.slow
def test_module_of_a_package_on_one_rank_gets_torchruns_variables(project: Path, tmp_path: Path) -> None:
    """`-m mypkg.train` as `python -m` runs it; with one rank (no torchrun in between) the script still
    gets RANK, WORLD_SIZE, MASTER_ADDR/PORT, as `torchrun --nproc-per-node 1` would give them."""
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "-m", "mypkg.train", "--run-name", "mod", "--runs-dir", str(runs), "--", "a b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = reports((runs / "mod" / "logs" / "rank0.log").read_text())
    assert seen == [{"greeting": "hello from mypkg", "name": "__main__", "argv": ["a b"], "RANK": "0",
                     "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}], seen


@pytest.mark.slow
def test_script_exit_code_is_the_runs(project: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "fail.py", "--procs-per-node", "2", "--run-name", "fails", "--runs-dir", str(runs))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "the script failed with exit code 3" in proc.stdout
    status = user_cli(project, "status", "fails", "--runs-dir", str(runs))
    assert status.returncode == 0
    assert "state: failed" in status.stdout.splitlines() and "exit_code: 3" in status.stdout.splitlines(), status.stdout
    info = json.loads((runs / "fails" / "run.json").read_text())
    assert info["failed_rank"] == 1 and "pid" not in info
    assert "rank 1 gives up" in (runs / "fails" / "logs" / "rank1.log").read_text()
    assert "rank 1 gives up" not in (runs / "fails" / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_rank_failing_after_rank_0_completed_fails_the_run(project: Path, tmp_path: Path) -> None:
    """Ranks of a script finish on their own: rank 0 may have written `completed` before another rank fails."""
    runs = tmp_path / "runs"
    proc = user_cli(project, "run", "late.py", "--procs-per-node", "2", "--run-name", "late", "--runs-dir", str(runs))
    assert proc.returncode == 3 and "the script failed with exit code 3" in proc.stdout, proc.stdout + proc.stderr
    status = user_cli(project, "status", "late", "--runs-dir", str(runs)).stdout.splitlines()
    assert "state: failed" in status and "exit_code: 3" in status, status
    assert read_result(runs / "late")["outcome"] == "failed" and read_result(runs / "late")["exit_code"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["wrapper", "script"])
def test_a_sigkilled_rank_fails_the_run_everywhere_with_one_exit_code(killed: str, project: Path,
                                                                        tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) to rank 1's wrapper (`python -m jobs.script`) or to its script: the run
    failed with 137 (128 + 9) on the console, in its exit code, run.json, result.json and `status`.
    Rank 0 then gets torchrun's SIGTERM, which is no stop: nobody told the launcher to stop."""
    runs = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, "-m", "launcher", "run", "killable.py", "--procs-per-node", "2",
                              "--run-name", "kp", "--runs-dir", str(runs)], cwd=project, env=user_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = runs / "kp" / "logs" / "rank1.log"

    def pids() -> list[str]:
        if first.poll() is not None:
            raise AssertionError(f"the run ended before the kill: {first.communicate()[0]}")
        text = log.read_text() if log.exists() else ""
        return text.split("]: pid ", 1)[1].split()[:3:2] if " wrapper " in text else []

    script, wrapper = wait_until(pids, "rank 1's script to start", timeout=120)
    os.kill(int(wrapper if killed == "wrapper" else script), signal.SIGKILL)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 137, out
    assert "run kp: the script failed with exit code 137" in out and "completed" not in out, out
    assert "[rank1] pid" in out and "[rank1] [rank1]" not in out, out  # torch's own prefix, shown once
    status = user_cli(project, "status", "kp", "--runs-dir", str(runs)).stdout.splitlines()
    assert "state: failed" in status and "exit_code: 137" in status, status
    info, result = json.loads((runs / "kp" / "run.json").read_text()), read_result(runs / "kp")
    assert result["outcome"] == "failed" and result["exit_code"] == info["exit_code"] == 137, (result, info)
    assert info["state"] == "failed" and not result["signal"], (result, info)


@pytest.mark.slow
def test_cancel_sends_one_sigterm_to_a_plain_script(project: Path, tmp_path: Path) -> None:
    """No runtime API: `launcher cancel` reaches the script's own SIGTERM handler, once per rank (a
    second SIGTERM would interrupt that handler's own cleanup); a second launch of it is refused."""
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    command = ["run", "sigterm.py", "--procs-per-node", "2", "--run-name", "term", "--runs-dir", str(runs)]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *command, "--", str(marker)], cwd=project,
                             env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [runs / "term" / "logs" / f"rank{rank}.log" for rank in (0, 1)]

    def both_waiting() -> bool:
        if first.poll() is not None:
            raise AssertionError(f"the run ended before it was cancelled: {first.communicate()[0]}")
        return all(log.exists() and "waiting for SIGTERM" in log.read_text() for log in logs)

    wait_until(both_waiting, "both ranks to wait for SIGTERM", timeout=120)
    config = (runs / "term" / "config.yaml").read_text()
    again = user_cli(project, *command, "--", str(marker))
    assert again.returncode == 2 and "is already running" in again.stderr, again.stderr
    assert (runs / "term" / "config.yaml").read_text() == config
    follow = subprocess.Popen([sys.executable, "-m", "launcher", "logs", "term", "--rank", "1", "--follow",
                               "--runs-dir", str(runs)], cwd=project, env=user_env(), stdout=subprocess.PIPE, text=True)
    cancel = user_cli(project, "cancel", "term", "--runs-dir", str(runs))
    assert cancel.returncode == 0 and "sent SIGTERM" in cancel.stdout, cancel.stdout + cancel.stderr
    assert "does not use the runtime API" in cancel.stdout and "checkpoint" not in cancel.stdout, cancel.stdout
    out = first.communicate(timeout=120)[0]
    followed = follow.communicate(timeout=60)[0]  # `logs --follow` ends by itself once the run has stopped
    assert "waiting for SIGTERM" in followed and "stopping after 1 SIGTERM" in followed, followed
    assert first.returncode == 143, out  # stopped by SIGTERM, as a shell would say (128 + 15)
    assert "Traceback" not in out and "SignalException" not in out and "death signal" not in out, out
    assert "run term: the script was cancelled (SIGTERM)" in out, out
    for rank in (0, 1):
        assert Path(f"{marker}.{rank}").read_text() == "1 SIGTERM\n", f"rank {rank}: {out}"
    status = user_cli(project, "status", "term", "--runs-dir", str(runs)).stdout.splitlines()
    assert "state: cancelled" in status and "signal: SIGTERM" in status and "exit_code: 143" in status, status
    result = read_result(runs / "term")
    info = json.loads((runs / "term" / "run.json").read_text())
    assert result["outcome"] == "cancelled" and result["exit_code"] == info["exit_code"] == 143, (result, info)


@pytest.mark.slow
def test_ctrl_c_reaches_a_one_rank_script_as_one_sigterm(project: Path, tmp_path: Path) -> None:
    """Ctrl-C in the terminal signals the launcher's whole process group: the script still gets one
    SIGTERM (from the rank wrapper), not the terminal's SIGINT as well, nor a SIGTERM per signal."""
    runs, marker = tmp_path / "runs", tmp_path / "marker"
    first = subprocess.Popen([sys.executable, "-m", "launcher", "run", "sigterm.py", "--run-name", "int",
                              "--runs-dir", str(runs), "--", str(marker)], cwd=project, env=user_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = runs / "int" / "logs" / "rank0.log"
    wait_until(lambda: log.exists() and "waiting for SIGTERM" in log.read_text(), "the script to start", timeout=60)
    os.killpg(first.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the foreground process group
    out = first.communicate(timeout=60)[0]
    assert Path(f"{marker}.0").read_text() == "1 SIGTERM\n", out
    assert "KeyboardInterrupt" not in out, out
    result = read_result(runs / "int")
    assert result["outcome"] == "preempted" and result["exit_code"] == 130 == first.returncode, result  # 128 + SIGINT


@pytest.mark.parametrize("handled", [True, False])
def test_a_notice_is_forwarded_as_it_is_only_to_a_script_that_handles_it(handled: bool, tmp_path: Path) -> None:
    """A Slurm notice (USR2) reaches a script that handles it (the runtime API) as USR2, so it can tell
    a preemption from a cancel; any other script gets the SIGTERM it knows how to handle."""
    from jobs.script import Forwarder

    got = tmp_path / "got"
    code = f'''
import signal, sys, time
def note(signum, frame):
    open({str(got)!r}, "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, note)
if {handled}:
    signal.signal(signal.SIGUSR2, note)
print("ready", flush=True)
time.sleep(60)
'''
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    forwarder = Forwarder()
    forwarder.child = child
    forwarder._handle(signal.SIGUSR2, None)
    assert child.wait(timeout=30) == 0
    assert got.read_text() == ("SIGUSR2" if handled else "SIGTERM")
    assert forwarder.signal_name == "SIGUSR2"  # what the wrapper reports either way: a preemption
