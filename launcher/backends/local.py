"""Local backend: ranks on this machine through torchrun (`torch.distributed.run`); several runs
(a sweep's trials) run one after another.

The launcher process stays in front of torchrun: it records its pid for `launcher cancel` and
turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a SIGTERM for torchrun, which forwards it to every
rank; the ranks then agree on a step, save and exit (torchrun itself does not forward USR1/USR2).
Each pid goes into run.json with its process start time, and both leave run.json when the run
ends: a pid reused by another process later is never taken for the run's."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jobs.script import exit_code, settle
from jobs.stacks import dump, local_ranks
from launcher.backends import process_start, run_process
from launcher.checks import Check
from launcher.backends.base import LIVE_STATES, Batch, Launched, Planned, print_log, what_a_stop_does
from jobs.schema.run_dir import PROGRESS, Run
from jobs.script_start import RESTART_VAR
from jobs.watchdog import Hang, Watchdog, end_hung_attempt, restart_in_place, status_fields
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.errors import UsageError

RESTARTS_RUNS = False  # a stopped local run starts again only when the user launches it again
# Ranks per CPU allowed before a launch is refused: oversubscribing a little is common (a 4-rank gloo test on
# a 2-core laptop), 100000 ranks are a typo that would start processes until the machine stalls.
RANKS_PER_CPU, MIN_RANKS_LIMIT = 4, 8
MAX_RANKS_ENV = "LAUNCHER_MAX_LOCAL_RANKS"  # the user's own limit, for a machine they know can take more


def rank_command(recipe: RecipeConfig, run: Run) -> list[str]:
    # the trainer, or (`launcher run`) the wrapper that runs the user's script
    entry = ["-m", "jobs.script" if recipe.script else "jobs.train", "--run-dir", str(run.dir)]
    nproc = recipe.parallel.procs_per_node
    if nproc == 1:
        return [sys.executable, *entry]  # one rank: no torchrun, no process group
    return [sys.executable, "-m", "jobs.torchrun", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", *entry]


def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    if recipe.parallel.nodes != 1:
        raise UsageError(f"cluster config {cluster.name!r} (local) runs one node but the recipe asks for "
                         f"parallel.nodes={recipe.parallel.nodes}", hint="set parallel.nodes=1 or use a Slurm "
                         "cluster config (--cluster ...)")
    nproc, limit = recipe.parallel.procs_per_node, local_ranks_limit()
    if nproc > limit:
        raise UsageError(f"parallel.procs_per_node={nproc}: more ranks than this machine can run ({_cpus()} CPUs: "
                         f"at most {limit}, {RANKS_PER_CPU} per CPU)", hint=f"lower parallel.procs_per_node "
                         f"(--procs-per-node), or allow more: {MAX_RANKS_ENV}={nproc}")


def _cpus() -> int:
    """The CPUs this process may run on (taskset, a cgroup's cpuset), not the machine's total."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_ranks_limit() -> int:
    """How many ranks one local launch may start: $LAUNCHER_MAX_LOCAL_RANKS, else a few per CPU."""
    given = os.environ.get(MAX_RANKS_ENV, "").strip()
    if not given:
        return max(MIN_RANKS_LIMIT, RANKS_PER_CPU * _cpus())
    if not given.isdigit() or int(given) < 1:
        raise UsageError(f"{MAX_RANKS_ENV}={given[:40]!r}: not a positive whole number",
                         hint="set it to the most ranks one local launch may start, or unset it")
    return int(given)


def check_many(named: Sequence[tuple[str, RecipeConfig]], cluster: ClusterConfig) -> None:
    """Runs launched together run one after another: any mix of recipes will do."""


def launch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """Start the ranks and wait for them, starting them again in place after a hang or a crash while the
    run's budgets allow (jobs.watchdog); the ranks' exit code."""
    check(recipe, cluster)
    env = dict(os.environ)
    # 2 ranks x N intra-op threads oversubscribe small machines; torchrun would also default to 1.
    env.setdefault("OMP_NUM_THREADS", "1" if recipe.parallel.procs_per_node > 1 else env.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        del env["OMP_NUM_THREADS"]
    run.update(remove=("inplace_restarts", "inplace_stop"))  # each launch has its whole budget
    told, attempt = _Told(), 1
    while True:
        ended = _attempt(recipe, run, {**env, RESTART_VAR: str(attempt - 1)}, told, attempt)
        if ended is None or not restart_in_place(run, recipe.resilient, *ended):
            break
        attempt += 1
    return run.info().exit_code or 0


def _attempt(recipe: RecipeConfig, run: Run, env: dict[str, str], told: "_Told",
             attempt: int) -> Optional[tuple[str, str]]:
    """One start of every rank, to its end: None when it ended well or was told to stop, else the kind of
    ending that a restart is counted as ("hangs", "crashes") and why."""
    shutil.rmtree(run.dir / PROGRESS, ignore_errors=True)  # the previous attempt's reports
    child = subprocess.Popen(rank_command(recipe, run), env=env)
    watchdog = Watchdog(run, recipe.parallel.procs_per_node, recipe.resilient.hang_timeout_s, child.pid)
    hang = None
    try:
        run.update(pid=child.pid, pid_start=process_start(child.pid), launcher_pid=os.getpid(),
                   launcher_start=process_start(os.getpid()), state="running")
        hang = _wait(child, told, watchdog)
        if hang is not None:
            end_hung_attempt(run, watchdog, hang, child.pid, attempt)
            child.wait()
    finally:
        if child.poll() is not None:  # the ranks are gone: their pids must not outlive them in run.json
            settle(run, told.signal, exit_code(child.returncode))  # the one ending: result.json, run.json, status
            run.update(remove=("pid", "pid_start", "launcher_pid", "launcher_start"))
    if told.signal:
        return None
    if hang is not None:
        return "hangs", hang.short()
    code = exit_code(child.returncode)
    return ("crashes", _crash_reason(run, code)) if code else None


def _crash_reason(run: Run, code: int) -> str:
    info = run.info()
    rank = f"rank {info.failed_rank} " if info.failed_rank is not None else "a rank "
    return f"{rank}exited with code {info.exit_code or code}"


def launch_many(planned: Sequence[Planned], cluster: ClusterConfig, batch: Batch) -> Launched:
    """One run after another (they would share this machine's cores); a run stopped by a signal
    (Ctrl-C, SIGTERM: its ranks saved) stops the rest too, and the same command resumes them."""
    failed = []
    for i, plan in enumerate(planned):
        run = plan.prepare()
        print(f"[{i + 1}/{len(planned)}] run {run.name}", flush=True)
        code = launch(plan.recipe, cluster, run)
        result = run.result()
        if result.signal:
            print(f"run {run.name} stopped by {result.signal} at step {result.step}; the rest of "
                  f"{batch.name} does not start (the same command resumes it)", file=sys.stderr, flush=True)
            return Launched(1, ended=True)
        if code != 0 or result.outcome != "completed":
            failed.append(run.name)
            print(f"run {run.name} failed (exit code {code}); logs: {run.dir / 'logs'}", file=sys.stderr, flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return Launched(1 if failed else 0, ended=True)


def check_workers(recipe: RecipeConfig, cluster: ClusterConfig, workers: int) -> None:
    """Any number of workers: they queue for this machine's cores."""


def study_uri(recipe: RecipeConfig, cluster: ClusterConfig, name: str) -> Optional[str]:
    """None: the journal file in the sweep's folder, which every worker shares."""
    return None


def run_trial_here(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """A Bayesian sweep's trial, from its worker on this machine: an ordinary launch."""
    return launch(recipe, cluster, run)


def launch_workers(recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, name: str, attempt: int,
                   workers: int, work_here: Callable[[int], int]) -> Launched:
    """A Bayesian sweep's workers: one runs in this process (trials one after another); several are
    processes of their own (`launcher.sweeps.worker`), trials several at once. Ctrl-C or SIGTERM
    reaches every worker's trial, whose ranks save; the same command resumes them."""
    if workers == 1:
        return Launched(work_here(0), ended=True)
    cmd = [sys.executable, "-m", "launcher.sweeps.worker", "--sweep-dir", str(folder), "--worker"]
    children = [subprocess.Popen([*cmd, str(i)]) for i in range(workers)]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return Launched(max(codes), ended=True)


def environment_checks(cluster: ClusterConfig) -> list[Check]:
    """Nothing beyond what `launcher doctor` checks for every backend: torchrun ships with torch."""
    return []


def workers_live(batch_id: str) -> bool:
    """Local workers have all ended when launch_workers returns (it gives no batch id)."""
    return False


def wait_workers(batch_id: str) -> int:
    return 0


def status(run: Run) -> dict[str, Any]:
    info, result = run.info(), run.result()
    pid = run_process(info, "pid", "pid_start")
    if pid:
        state = "running"
    elif result:
        state = result.outcome
    elif run.problems():
        state = "unknown"
    else:
        state = "failed" if info.launches else "unknown"
    running = {"pid": pid} if pid else {}
    summary = {**result.pick("step", "epoch", "signal"), **result.metrics}  # every val/* the recipe measures
    # restarts inside this launch by kind (jobs.watchdog), and why the run stopped if a budget ran out
    return {"run": run.name, "state": state, "backend": "local", "dir": str(run.dir), **running, **summary,
            **status_fields(info, bool(pid))}


def live(run: Run) -> Optional[str]:
    pid = run_process(run.info(), "pid", "pid_start")
    return f"running (pid {pid}, {run.dir})" if pid else None


def cancel(run: Run) -> str:
    info = run.info()
    pid = run_process(info, "launcher_pid", "launcher_start") or run_process(info, "pid", "pid_start")
    if not pid:
        return f"run {run.name} is not running"
    run.update(state="cancelled")  # before the signal: the ranks and the launcher then know it was a cancel
    os.kill(pid, signal.SIGTERM)  # the launcher forwards it to torchrun, which forwards it to every rank
    return f"sent SIGTERM to run {run.name} (pid {pid}); {what_a_stop_does(run)}"


def wait(runs: Sequence[Run], poll_s: float = 1.0) -> dict[str, str]:
    """Runs launched from this process have ended already; one launched by another process is
    followed until its ranks have exited."""
    while any(live(run) for run in runs):
        time.sleep(poll_s)
    return {run.name: status(run)["state"] for run in runs}


class _Told:
    """The stop signal this launcher was told (and forwarded to the ranks), if any: only this process
    knows whether the ranks' SIGTERM was a stop or torchrun's reaction to a rank that died."""

    signal: Optional[str] = None


def _wait(child: subprocess.Popen, told: _Told, watchdog: Watchdog, poll_s: float = 1.0) -> Optional[Hang]:
    """Until the ranks end (None) or the watchdog finds a hang (which it returns; the ranks still run).
    A run told to stop is not watched: its ranks are saving."""
    def forward(signum: int, _frame: FrameType | None) -> None:
        told.signal = told.signal or signal.Signals(signum).name
        child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        while True:
            try:
                child.wait(timeout=poll_s)  # returns as soon as the ranks end
                return None
            except subprocess.TimeoutExpired:
                hang = None if told.signal else watchdog.check()
                if hang is not None:
                    return hang
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stacks(run: Run, dest: Path) -> dict[int, str]:
    """The ranks are processes of this machine: each recorded its pid (jobs.stacks)."""
    return dump(local_ranks(run.dir), dest)


def logs(run: Run, rank: int, follow: bool) -> int:
    return print_log(run, rank, follow, lambda: status(run)["state"] in LIVE_STATES)
