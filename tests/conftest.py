"""Shared fixtures. Multi-rank tests run real processes (torchrun, gloo on CPU)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import pytest

if TYPE_CHECKING:  # torch is imported where it is used: the pure tests never pay for it
    import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def run_cli(*args: str, runs_dir: Path | None = None, timeout: float = 600, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """The real `launcher` CLI in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "launcher", *args]
    if runs_dir is not None:
        cmd += ["--runs-dir", str(runs_dir)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def user_env() -> dict[str, str]:
    """The environment of a user's shell with the launcher installed: the repository (the launcher's own
    code) on the path, the user's project folder not (the launcher must add it for the ranks)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def user_cli(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` run from a user's project directory, with user_env()."""
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=project, env=user_env(), capture_output=True,
                          text=True, timeout=timeout)


def launch_until_step(recipe: str, overrides: list[str], runs_dir: Path, name: str, step: int,
                      timeout: float = 180) -> subprocess.Popen:
    """`launcher launch` started in a session of its own (output captured), returned once its run has
    logged `step`: the moment a test stops or kills it. Fails if the run ends before that step."""
    cmd = [sys.executable, "-m", "launcher", "launch", recipe, *overrides, "--run-name", name,
           "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_until(lambda: reached_step(runs_dir / name, step, proc), f"run {name} to reach step {step}",
               timeout=timeout, poll=0.02)
    return proc


def reached_step(run_dir: Path, step: int, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""  # it ended before the step
    return max_logged_step(run_dir) >= step


class Background:
    """The real `launcher` CLI started in the background; `finish()` waits for it and returns its output.
    A local run that a test compares with a Slurm job's trains while that job is scheduled or requeued,
    when the cores are otherwise idle. Its output goes to a file, so a full pipe never stalls it."""

    def __init__(self, *args: str, runs_dir: Path, env: dict | None = None, cwd: Path = REPO) -> None:
        ours = list(args[:args.index("--")] if "--" in args else args)  # what follows `--` is a script's
        self.cmd = [sys.executable, "-m", "launcher", *ours, "--runs-dir", str(runs_dir), *args[len(ours):]]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=full_env, stdout=self._out, stderr=subprocess.STDOUT,
                                     text=True)

    def finish(self, timeout: float = 600) -> str:
        """Wait for it; a non-zero exit raises with its output."""
        self.proc.wait(timeout=timeout)
        self._out.seek(0)
        out = self._out.read()
        if self.proc.returncode != 0:
            raise AssertionError(f"{' '.join(self.cmd)} exited {self.proc.returncode}\n{out}")
        return out

    def stop(self) -> None:
        """For a test that failed before it waited: SIGTERM (the launcher forwards it to the ranks)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)


def assert_refused_at_load(proc: subprocess.CompletedProcess, key: str, runs_dir: Path) -> None:
    """A bad recipe value: exit 2, the first line of stderr an error naming `key`, nothing written."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and f"{key}:" in first, proc.stderr
    assert not any(runs_dir.iterdir())


def read_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a completed run wrote (model.pt), on the CPU whatever device trained them."""
    import torch

    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def max_logged_step(run_dir: Path) -> int:
    """The highest step in the run's metrics.jsonl so far (0 before there is one). Only whole lines are
    read: the file is polled while the run appends to it."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or a line still being written
    return max([json.loads(line).get("step", 0) for line in lines if line.strip()] or [0])


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 240, poll: float = 0.2) -> T:
    """Call `predicate` every `poll` seconds until it returns something true, and return that.

    After `timeout` seconds a TimeoutError says what was waited for (`what`). A predicate that sees the
    wait is hopeless (the process it watches has died) raises, and that error ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


class Uninterrupted:
    """Final weights of uninterrupted local vgg_pretrain runs, one per distinct list of overrides, made
    once for every test that stops a run and compares the resumed one with it (test_resume,
    test_s3_runs: where checkpoints are kept must not change what is trained). `start` begins one in
    the background, for a test whose own run leaves a core idle (a 1-rank run); calling waits for it.

    Under xdist the files of one session run on two workers: each run is kept in `folder` (shared by
    the workers) under a lock, so the worker that starts it first trains it and the other one waits
    for it and reads its weights, rather than training it a second time."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._started: dict[tuple[str, ...], tuple[Background, Any]] = {}  # ours, training; its lock held
        self._done: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def _slot(self, key: tuple[str, ...]) -> Path:
        slot = self._folder / hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        slot.mkdir(parents=True, exist_ok=True)
        return slot

    def _train(self, key: tuple[str, ...], slot: Path) -> Background:
        return Background("launch", "vgg_pretrain", *key, "--run-name", "straight", runs_dir=slot / "runs")

    def start(self, overrides: list[str]) -> None:
        key = tuple(overrides)
        if key in self._started or key in self._done:
            return
        slot = self._slot(key)
        lock = open(slot / "lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker is training it: calling waits for that one
            lock.close()
            return
        if (slot / "done").exists():
            lock.close()
            return
        self._started[key] = (self._train(key, slot), lock)

    def __call__(self, overrides: list[str]) -> dict[str, torch.Tensor]:
        key = tuple(overrides)
        if key not in self._done:
            slot = self._slot(key)
            self.start(overrides)
            if key in self._started:
                run, lock = self._started.pop(key)
            else:
                lock = open(slot / "lock", "w")
                fcntl.flock(lock, fcntl.LOCK_EX)  # while another worker trains it
                run = None if (slot / "done").exists() else self._train(key, slot)  # unless that one failed
            try:
                if run is not None:
                    run.finish()
                    (slot / "done").touch()
            finally:
                lock.close()
            self._done[key] = final_params(slot / "runs" / "straight")
        return self._done[key]

    def stop(self) -> None:
        """A test that failed before waiting leaves its run going."""
        for run, lock in self._started.values():
            run.stop()
            lock.close()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uninterrupted]:
    """The shared uninterrupted runs (Uninterrupted), in a folder every xdist worker of this session sees
    (each worker's base temporary folder is inside the session's)."""
    base = tmp_path_factory.getbasetemp()
    made = Uninterrupted((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "uninterrupted")
    yield made
    made.stop()


@pytest.fixture(scope="session")
def slurm() -> None:
    """The real single-node Slurm of scripts/slurm_local.sh; skipped only where it cannot be installed."""
    from slurm_cluster import ensure_slurm, slurm_available

    ok, why = slurm_available()
    if not ok:
        pytest.skip(f"local Slurm cannot run here: {why}")
    ensure_slurm()


@pytest.fixture(scope="session")
def vm_hosts() -> Path:
    """The loopback "VMs" of scripts/vms_local.sh (one sshd on 127.0.0.2-127.0.0.5, port 2222): its state
    folder, holding client_key. Skipped only where sshd cannot be installed."""
    from vm_hosts import ensure_vms, vms_available

    ok, why = vms_available()
    if not ok:
        pytest.skip(f"loopback VMs cannot run here: {why}")
    return ensure_vms()


# Files whose tests use the machine's one Slurm beyond what a fixture says: `make slurm-up` and jobs from the
# docs' commands.
SLURM_FILES = {"test_readme.py"}
# Files whose tests use the loopback VMs beyond what a fixture says (spot notices from metadata servers on the
# hosts' addresses: two VM tests side by side once heard each other's node agents).
VM_FILES = {"test_vms_runs.py", "test_vms_ssh.py", "test_vms_restarts.py"}
# Runs whose timing under a loaded machine is itself under test (spot notices over SSH across two "VMs", a
# node killed mid-run): `make test` runs them after the others, one at a time, with nothing beside them. (A
# hang across two "VMs" is not timing-bound: its 8 s timeout is many times a loaded step.)
EXCLUSIVE_FILES = {"test_vms_runs.py"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything, and before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A Slurm test runs jobs of several processes: it is in the slow tier as well, so that `-m "not slow"`
    stays the quick tier on a machine where Slurm is installed.

    Under `pytest -n 2 --dist loadgroup` (make test) each file is one group, so its module fixtures are
    made once, on one worker; every test that uses the machine's one Slurm is in one group "slurm", so those
    run one at a time (a Slurm job never waits behind another test's), and every test on the loopback VMs in
    one group "vms" (their metadata servers and node agents share the hosts' addresses); the two groups run
    beside each other."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
        slurm = item.get_closest_marker("slurm") or "slurm" in item.fixturenames or item.path.name in SLURM_FILES
        vms = "vm_hosts" in item.fixturenames or item.path.name in VM_FILES
        item.add_marker(pytest.mark.xdist_group("slurm" if slurm else "vms" if vms else item.path.name))
        if item.path.name in EXCLUSIVE_FILES:
            item.add_marker(pytest.mark.exclusive)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker sends the collected ids to the scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    """The group of each test at the end of its id, as `--dist loadgroup` schedules by ("...::test@slurm").

    xdist (3.8) appends it by assigning `item._nodeid`, which pytest 9 no longer reads (its ids are
    structured: pytest-dev/pytest-xdist#1386): each test was then scheduled on its own, so a module's
    fixtures were made on both workers and two Slurm tests ran at once. Where the suffix is missing, the
    id is rebuilt with it; where xdist's own assignment still works, it is there already."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist's workers under loadgroup
        return
    for item in session.items:
        group = item.get_closest_marker("xdist_group")
        node_id = getattr(item, "_id", None)
        if group is None or item.nodeid.endswith(f"@{group.args[0]}") or not hasattr(node_id, "parse"):
            continue
        item._id = type(node_id).parse(f"{item.nodeid}@{group.args[0]}")
