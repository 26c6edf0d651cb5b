"""Tier 1: the backend interface without a real scheduler.

- The registry names every backend; nothing outside `launcher/backends/` asks which backend it has.
- One Slurm watcher: `sacct`/`squeue` stubs on PATH record their calls, so a status over many runs is
  seen to cost one call of each, and `wait` is seen to follow a requeue and to give up on a job Slurm
  has no record of.
- Both Slurm paths (submitit's script and `launcher sbatch`'s) ask for the same options.
- A local batch prepares each run right before it starts it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from launcher import backends
from launcher.backends import local, slurm
from launcher.backends.base import Batch, Planned
from launcher.backends.slurm_watch import SlurmWatcher, wait_for_runs
from launcher.checks import Check
from jobs.schema.run_dir import Run
from launcher.runs import prepare_run
from launcher.sbatch import render_sbatch
from jobs.schema import load_cluster, load_recipe
from jobs.schema.errors import UsageError
from test_sbatch import option_values

REPO = Path(__file__).resolve().parent.parent
LOGGING_STUB = """\
#!/bin/sh
echo "$0 $*" >> {log}
cat {answer} 2>/dev/null
"""


@pytest.fixture
def slurm_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sacct`, `squeue` and `srun` first on PATH: each logs its call and prints `<name>.answer`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sacct", "squeue", "srun"):
        (bin_dir / name).write_text(LOGGING_STUB.format(log=tmp_path / "calls.log", answer=bin_dir / f"{name}.answer"))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def _calls(tmp_path: Path, command: str) -> list[str]:
    log = tmp_path / "calls.log"
    return [line for line in log.read_text().splitlines() if line.split()[0].endswith(command)] if log.exists() else []


def _slurm_run(root: Path, name: str, job_id: str, state: str = "submitted") -> Run:
    run = Run(name, root / name)
    run.dir.mkdir(parents=True)
    run.update(run_name=name, backend="slurm", launches=1, job_id=job_id, job_ids=[job_id], state=state)
    return run


# ----------------------------------------------------------------------------- registry
def test_registry_names_each_backend_and_refuses_others() -> None:
    assert backends.get("local") is local and backends.get("slurm") is slurm
    with pytest.raises(UsageError, match="unknown backend 'vm'") as err:
        backends.get("vm")
    assert "local, slurm" in str(err.value)


def test_nothing_outside_the_backends_asks_which_backend_it_has() -> None:
    """A new backend is one module and one registry line: no `if backend == ...` elsewhere. The names come
    from the registry, so a backend added there is covered here without editing this test."""
    names = "|".join(re.escape(name) for name in backends.BACKENDS)
    asking = re.compile(rf"""\.backend\b[^\n]*[!=]=|[!=]=\s*["']({names})["']|\bin\s*[([{{][^\n]*["']({names})["']""")
    assert all(asking.search(f"if kind == '{name}'") and asking.search(f'if kind in ("x", "{name}")')
               for name in backends.BACKENDS)
    files = [path for folder in ("launcher", "jobs") for path in (REPO / folder).rglob("*.py")
             if "backends" not in path.parts and "schema" not in path.parts]  # the config sections name them
    offenders = [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for path in files
                 for i, line in enumerate(path.read_text().splitlines(), 1) if asking.search(line)]
    assert len(files) > 20 and offenders == []


def test_the_backends_do_not_import_the_doctor() -> None:
    """The doctor asks a backend for its checks (Backend.environment_checks); a backend builds them from
    launcher.checks, never from launcher.doctor, so the two never import each other."""
    files = [path for folder in ("launcher/backends", "launcher/vms") for path in (REPO / folder).rglob("*.py")]
    importing = re.compile(r"^\s*(from|import)\s+launcher\.doctor\b|^\s*from\s+launcher\s+import\s+[^\n]*\bdoctor\b")
    offenders = [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for path in files
                 for i, line in enumerate(path.read_text().splitlines(), 1) if importing.search(line)]
    assert len(files) > 10 and offenders == []


def test_each_backend_names_its_own_doctor_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm command anywhere
    found = backends.get("slurm").environment_checks(load_cluster("local"))
    assert [(type(c), c.name, c.ok) for c in found] == [(Check, "Slurm", False)] and "sbatch" in found[0].detail
    assert backends.get("local").environment_checks(load_cluster("local")) == []


# ----------------------------------------------------------------------------- the Slurm watcher
def test_status_of_many_runs_costs_one_sacct_call(tmp_path: Path, slurm_stubs: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (slurm_stubs / "sacct.answer").write_text("12_0|COMPLETED\n12_1|RUNNING\n12_[2-3%4]|CANCELLED by 0\n15|FAILED\n")
    (slurm_stubs / "squeue.answer").write_text("12_1|RUNNING\n16|PENDING\n")
    runs = [_slurm_run(tmp_path, f"t{i}", f"12_{i}") for i in range(4)]
    runs += [_slurm_run(tmp_path, "plain", "15"), _slurm_run(tmp_path, "fresh", "16")]
    monkeypatch.setattr(slurm, "WATCHER", SlurmWatcher(max_age_s=60))  # as in a new `launcher` process
    states = [backends.status(run)["state"] for run in reversed(runs)]  # the last three ask about new arrays
    assert states[::-1] == ["completed", "running", "cancelled", "cancelled", "failed", "pending"]
    # one call per array never seen before (16, 15, 12), each covering every array seen so far; the other
    # three elements of array 12 are answered from the same call
    assert [c.split(" -j ")[1].split()[0] for c in _calls(tmp_path, "sacct")] == ["16", "15,16", "12,15,16"]
    assert len(_calls(tmp_path, "squeue")) == 3


def test_a_job_accounting_still_calls_pending_is_running_when_squeue_says_so(slurm_stubs: Path) -> None:
    """sacct lags behind the controller (seen under load: `launcher stacks` refused a job whose ranks ran):
    a PENDING in accounting gives way to squeue's state; any other accounting state stands."""
    from launcher.backends.slurm_watch import read_states

    (slurm_stubs / "sacct.answer").write_text("21|PENDING\n22|COMPLETED\n23|PENDING\n")
    (slurm_stubs / "squeue.answer").write_text("21|RUNNING\n22|RUNNING\n")
    assert read_states(["21", "22", "23"]) == {"21": "RUNNING", "22": "COMPLETED", "23": "PENDING"}


def test_watcher_answers_from_one_read_for_a_moment() -> None:
    reads: list[list[str]] = []

    def reader(arrays: list[str]) -> dict[str, str]:
        reads.append(list(arrays))
        return {"12_0": "RUNNING", "12_1": "PENDING", "15": "COMPLETED"}

    watcher = SlurmWatcher(max_age_s=60, reader=reader)
    assert watcher.states(["12_0", "15"]) == {"12_0": "RUNNING", "15": "COMPLETED"}
    assert watcher.state("12_1") == "PENDING" and watcher.state("12_7") == "UNKNOWN"  # same arrays: no new read
    assert reads == [["12", "15"]]
    watcher.state("20")
    assert reads == [["12", "15"], ["12", "15", "20"]]  # a new array: everything is read again, together
    watcher.states(["15"], max_age_s=0)
    assert len(reads) == 3


def test_wait_follows_a_requeue_to_its_end(tmp_path: Path, slurm_stubs: Path) -> None:
    """Rank 0 marks run.json "requeued" before `scontrol requeue`: a terminal Slurm state in between
    is not the end; once the run says otherwise, it is."""
    (slurm_stubs / "sacct.answer").write_text("5|COMPLETED\n")
    run = _slurm_run(tmp_path, "r", "5", state="requeued")
    timer = threading.Timer(0.5, lambda: run.update(state="completed"))
    timer.start()
    started = time.monotonic()
    assert wait_for_runs([run], poll_s=0.05) == {"r": "COMPLETED"}
    assert time.monotonic() - started >= 0.5
    timer.join()
    assert slurm.wait([run]) == {"r": "completed"}  # as `status` names it


def test_wait_gives_up_on_a_job_slurm_has_no_record_of(tmp_path: Path, slurm_stubs: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    runs = [_slurm_run(tmp_path, "lost", "404"), Run("never", tmp_path / "never")]  # the second has no job
    (slurm_stubs / "sacct.answer").write_text("")
    started = time.monotonic()
    assert wait_for_runs(runs, poll_s=0.05, lost_after_s=0.3) == {"lost": "UNKNOWN", "never": "UNKNOWN"}
    assert 0.3 <= time.monotonic() - started < 10
    assert "Slurm has no record of job 404 (run lost)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one set of options
def test_both_slurm_paths_ask_for_the_same_options(tmp_path: Path, slurm_stubs: Path) -> None:
    """`launch` (submitit's script) and `launcher sbatch` take their options from one function: every
    option of the plain script is in submitit's with the same value, but for the three that differ
    by design (the signal goes to every task, not the batch shell; submitit names its own log files)."""
    recipe = load_recipe("digits", ["parallel.nodes=2", "parallel.procs_per_node=8", "trainer.global_batch=512"])
    cluster = load_cluster("gpu_cluster")
    run = Run("same", tmp_path / "same")
    executor = slurm.make_executor(recipe, cluster, run.name, run.dir / "submitit")
    submitit_opts = option_values(executor._make_submission_file_text(executor._submitit_command_str, "x"))
    plain = option_values(render_sbatch(recipe, cluster, run, "/usr/bin/python3"))
    by_design = {"--signal", "--output", "--open-mode"}
    assert {k: v for k, v in plain.items() if k not in by_design} == \
        {k: submitit_opts.get(k, "missing") for k in plain if k not in by_design}
    assert plain["--mem"] == "480G" and plain["--reservation"] == "training" and "--exclusive" in plain
    assert submitit_opts["--signal"] == "USR2@180" and plain["--signal"] == "B:USR2@180"


# ----------------------------------------------------------------------------- local batches
def test_local_batch_prepares_each_run_right_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A batch stopped by a signal leaves the runs it never started as they were (a sweep's table
    shows them "not started", not "failed")."""
    cluster, recipe = load_cluster("local"), load_recipe("digits")
    prepared: list[str] = []

    def plan(name: str) -> Planned:
        return Planned(recipe, lambda: prepared.append(name) or prepare_run(recipe, cluster, name, tmp_path, "auto"))

    def interrupted(recipe: object, cluster: object, run: Run) -> int:
        (run.dir / "result.json").write_text(json.dumps({"outcome": "preempted", "step": 3, "signal": "SIGINT"}))
        return 1

    monkeypatch.setattr(local, "launch", interrupted)
    launched = local.launch_many([plan("a"), plan("b")], cluster, Batch("s", tmp_path / "s", 1))
    assert (launched.code, launched.ended, prepared) == (1, True, ["a"])
    assert not (tmp_path / "b").exists() and "stopped by SIGINT at step 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the VM backend's record
def test_vm_state_reads_and_writes_run_json_as_before(tmp_path: Path) -> None:
    """VmState is a typed view of the keys the VM backend keeps in run.json: the file keeps its format (a run
    launched before it reads the same), and a hand-edited value of the wrong type reads as unset."""
    from launcher.vms.state import VmState

    run = Run("r", tmp_path / "r")
    run.dir.mkdir()
    written = {"vm_head": "10.0.0.1", "vm_run_dir": "~/launcher/runs/r", "hosts": ["10.0.0.1", "10.0.0.2"],
               "vm_supervisor": 4321}
    run.update(run_name="r", backend="vms", **written)  # as `launch` wrote it before VmState existed
    state = VmState.of(run.info())
    assert (state.head, state.run_dir, state.hosts, state.started_pid) == ("10.0.0.1", "~/launcher/runs/r",
                                                                          ("10.0.0.1", "10.0.0.2"), 4321)
    assert state.to_dict() == written and VmState.from_dict(state.to_dict()) == state
    run.update(**VmState.entries(launches=2, hosts=["10.0.0.1"], placement={"10.0.0.1": [0, 1]}, waiting_for="x"))
    on_disk = json.loads(run.info_path.read_text())
    assert on_disk["vm_launches"] == 2 and on_disk["hosts"] == ["10.0.0.1"] and on_disk["placement"] == {
        "10.0.0.1": [0, 1]} and on_disk["waiting_for"] == "x" and on_disk["run_name"] == "r"
    run.update(supervisor_pid=True, supervisor_start="soon", vm_launches="2")  # a hand-edited file
    state = VmState.of(run.info())
    assert (state.supervisor_pid, state.supervisor_start, state.launches) == (None, None, 0)
    run.update(remove=VmState.keys("supervisor_pid", "supervisor_start"))
    assert "supervisor_pid" not in json.loads(run.info_path.read_text())
    with pytest.raises(TypeError, match="no field 'head_address'"):
        VmState.entries(head_address="x")


def test_states_without_squeue_come_from_sacct_and_without_sacct_the_error_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue only fills in what accounting lags behind: a machine without it still reads sacct's states.
    Without sacct no state can be known: a UsageError (one line and a hint), not a traceback."""
    from launcher.backends.slurm_watch import read_states

    only_sacct = tmp_path / "only_sacct"
    only_sacct.mkdir()
    (only_sacct / "sacct").write_text("#!/bin/sh\necho '4242|RUNNING'\n")
    (only_sacct / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", str(only_sacct))
    assert read_states(["4242"]) == {"4242": "RUNNING"}
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="sacct is not on PATH") as err:
        read_states(["4242"])
    assert "login node" in err.value.hint
