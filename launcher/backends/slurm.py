"""Slurm backend through submitit, on the login node: check, submit, follow and cancel jobs.

One Slurm task per rank; what runs inside the job (the rank entry, the environment table, requeue
decisions) is `jobs.environments.slurm`. A single run is one job; a sweep's trials are one job array
(one set of #SBATCH options, so every trial must ask for the same resources). Job states come from
one watcher (`slurm_watch`) that asks sacct about many jobs at once.

The batch shell must outlive a signal sent to the whole job (`scancel --full --signal=USR2`, as
some preemption setups do): submitit's script gets a trap for USR1/USR2 (srun in the batch step
forwards the signal to the ranks itself); `launcher sbatch`'s script already forwards them.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from jobs.environments.slurm import ENTRY_MODULE, SUPERVISOR, rank_main
from jobs.script import exit_code, settle
from jobs.stacks import node_command, read_answers
from launcher.backends.base import LIVE_STATES, Batch, Launched, Planned, print_log, what_a_stop_does
from launcher.backends.slurm_options import check_cluster, env_exports, job_options, one_line, setup_lines, source
from launcher.backends.slurm_watch import UNKNOWN, WATCHER, array_of, wait_for_runs
from launcher.checks import CHECK_TIMEOUT_S, Check, bounded, last_line
from jobs.schema.run_dir import Run, RunInfo
from jobs.schema import ClusterConfig, RecipeConfig, SlurmConfig, errors
from jobs.schema.errors import UsageError
from jobs.schema.secrets import write_private

# The launcher's own code, first on the import path of `python -m jobs.stacks` on the nodes (as the ranks run it)
CODE_ROOT = Path(__file__).resolve().parents[2]
STACKS_TIMEOUT_S = 90  # one dump per node takes seconds (jobs.stacks bounds it at 20 s); srun may wait a little
RESTARTS_RUNS = True  # a preempted, timed-out or admin-requeued job starts again by itself

SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "scancel")  # what `launcher doctor` looks for
# Slurm's state -> the state `status` reports (others are lower-cased)
_STATE_NAMES = {"RUNNING": "running", "PENDING": "pending", "REQUEUED": "requeued", "COMPLETED": "completed",
                "CANCELLED": "cancelled", "FAILED": "failed", "TIMEOUT": "timeout"}


# ----------------------------------------------------------------------------- checks
def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    """Everything a job script is made of, checked before a run directory exists (exit 2, nothing written)."""
    check_cluster(recipe, cluster)
    if shutil.which("sbatch") is None:
        raise UsageError(f"cluster config {cluster.name!r} uses Slurm but `sbatch` is not on PATH",
                         hint="run this on a Slurm login node (for the local test Slurm: make slurm-up)")


def check_many(named: Sequence[tuple[str, RecipeConfig]], cluster: ClusterConfig) -> None:
    """A job array has one set of #SBATCH options, so every run must ask for the same resources."""
    def shape(recipe: RecipeConfig) -> dict[str, Any]:
        return executor_parameters(recipe, cluster, "array")

    first_name, first = named[0]
    for name, recipe in named[1:]:
        if shape(recipe) != shape(first):
            a, b = first.parallel, recipe.parallel
            varied = [f"parallel.{key}" for key in ("nodes", "procs_per_node") if getattr(a, key) != getattr(b, key)]
            raise UsageError(
                f"trial {name} asks for parallel.nodes={b.nodes} parallel.procs_per_node={b.procs_per_node} "
                f"but {first_name} for parallel.nodes={a.nodes} parallel.procs_per_node={a.procs_per_node}: "
                f"a Slurm job array submits every trial with the same resources (one set of #SBATCH options)"
                f"{' (varied: ' + ', '.join(varied) + ')' if varied else ''}; nothing was submitted",
                hint="keep parallel.* fixed in a sweep, or run one sweep per resource shape")


# ----------------------------------------------------------------------------- submitit's batch script
# The batch shell must outlive USR1/USR2 sent to the whole job (`scancel --full`): bash would die of
# them, srun would then abort the step and the ranks would see SIGTERM instead of a preemption. A
# trap with a command (not '') lets children start with default dispositions; srun, itself in the
# batch step, gets the signal too and forwards it to every rank.
_SURVIVE_SIGNALS = [
    "# USR1/USR2 to the whole job (scancel --full): keep this shell alive; srun forwards them to the ranks",
    "trap 'echo \"submitit batch script: got SIGUSR1\" >&2' USR1",
    "trap 'echo \"submitit batch script: got SIGUSR2\" >&2' USR2",
]
# submitit's own parameter names for options it renders itself (the rest go to additional_parameters)
_SUBMITIT_NAMED = {"job_name", "partition", "account", "qos", "time", "nodes", "ntasks_per_node", "cpus_per_task",
                   "gpus_per_node", "mem", "constraint", "exclusive"}


def executor_parameters(recipe: RecipeConfig, cluster: ClusterConfig, job_name: str) -> dict[str, Any]:
    """submitit's parameters from the options `launcher sbatch` also uses (`slurm_options.job_options`). Its
    srun line never runs: the setup's last line hands the batch step to the supervisor (`_hand_over`), which
    runs srun itself (with --kill-on-bad-exit: one rank dying ends the step)."""
    s, src = cluster.slurm or SlurmConfig(), source(cluster)
    params: dict[str, Any] = {
        "signal_delay_s": s.grace_period_s, "stderr_to_stdout": True,
        "setup": _SURVIVE_SIGNALS + env_exports(src, s) + setup_lines(src, s),
        "additional_parameters": {"requeue": True},
    }
    for _, option, value in job_options(recipe, s, src, job_name):
        name = option[2:]
        typed: Any = True if value is None else int(value) if value.isdigit() else _for_sbatch(value)
        if name.replace("-", "_") in _SUBMITIT_NAMED:
            params[name.replace("-", "_")] = typed
        else:
            params["additional_parameters"][name] = typed
    return params


def _for_sbatch(value: str) -> str:
    """submitit writes `#SBATCH --key=<shlex.quote(value)>`; sbatch's parser (not bash: the line is a
    comment) takes a backslash as an escape even inside single quotes, so double it to keep it."""
    return value.replace("\\", "\\\\")


def _hand_over(python: str, folder: Path) -> list[str]:
    """The last setup lines: the batch step becomes the supervisor (`jobs.environments.slurm_supervise`),
    which runs submitit's srun line itself, watches for hangs and restarts the ranks in place; submitit's
    own srun line after the setup never runs. One batch step for both submit paths."""
    command = " ".join(shlex.quote(a) for a in [python, "-u", "-m", SUPERVISOR, "--submitit-folder", str(folder)])
    return ["# srun, the hang watchdog and restarts inside the allocation (jobs.environments.slurm_supervise)",
            "export SUBMITIT_EXECUTOR=slurm", "trap '' USR1 USR2", f"exec {command}"]


def make_executor(recipe: RecipeConfig, cluster: ClusterConfig, job_name: str, folder: Path) -> Any:
    import submitit

    src = source(cluster)
    python = one_line(src, "slurm.python", (cluster.slurm.python if cluster.slurm else None) or sys.executable)
    _check_folder(folder)
    # submitit puts `python` into the command line as given: quote it here
    executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python))
    params = executor_parameters(recipe, cluster, job_name)
    executor.update_parameters(**{**params, "setup": params["setup"] + _hand_over(python, folder)})
    return executor


def _check_folder(folder: Path) -> None:
    """submitit writes the folder into `#SBATCH --output=` (where sbatch expands %-patterns and
    eats backslashes) and into command lines: it must be one plain line."""
    one_line("command line", "run directory (--runs-dir, --run-name)", str(folder))
    if "%" in str(folder) or "\\" in str(folder):
        raise UsageError(f"run directory {str(folder)!r} contains '%' or '\\', which sbatch would expand in "
                         "the job's output path", hint="choose a run name and runs directory without them")


# ----------------------------------------------------------------------------- launching
def launch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """Submit the run as one job; 0 once it is queued (`wait` follows it)."""
    # A folder per launch: Slurm job ids repeat after a controller reset, and a stale result
    # file of an older job with the same id must never be read back.
    folder = run.dir / "submitit" / f"launch-{run.info().launches or 1}"
    executor = make_executor(recipe, cluster, run.name, folder)
    job = _submitted(cluster, [run], f"the job of run {run.name}",
                     lambda: [executor.submit(rank_main, str(run.dir))])[0]
    _record_job(run, job.job_id, folder)
    print(f"submitted Slurm job {job.job_id} for run {run.name} (logs: launcher logs {run.name})", flush=True)
    return 0


def launch_many(planned: Sequence[Planned], cluster: ClusterConfig, batch: Batch) -> Launched:
    """Every run as one element of one job array: element i runs `rank_main(<run i's directory>)`."""
    if not planned:
        return Launched(0, ended=False)
    runs = [plan.prepare() for plan in planned]
    folder = batch.folder / "submitit" / f"launch-{batch.launch}"  # a folder per launch, as for single runs
    # The array's job name is the batch's; its resources are every run's (`check_many`: one shape).
    executor = make_executor(planned[0].recipe, cluster, batch.name, folder)
    if batch.max_parallel:
        executor.update_parameters(array_parallelism=batch.max_parallel)
    jobs = _submitted(cluster, runs, f"the job array of {batch.name}",
                      lambda: executor.map_array(rank_main, [str(run.dir) for run in runs]))
    for run, job in zip(runs, jobs):
        _record_job(run, job.job_id, folder, sweep=batch.name)
    array_id = array_of(jobs[0].job_id)
    print(f"submitted Slurm job array {array_id} ({len(jobs)} trials) for {batch.name}", flush=True)
    return Launched(0, ended=False, batch_id=array_id)


def _submitted(cluster: ClusterConfig, runs: list[Run], what: str, submit: Callable[[], Iterable[Any]]) -> list[Any]:
    """submitit's jobs from `submit()`; a refusal by sbatch of `what` (the config asks for something
    this cluster does not have) is a one-line UsageError, and run directories made for it are removed."""
    from submitit.core.utils import FailedJobError

    try:
        return list(submit())
    except FailedJobError as err:
        for run in runs:
            _forget_unsubmitted(run)
        raise UsageError(f"sbatch refused {what}: {errors.one_line(str(err).strip(), 300)}",
                         hint=f"check the slurm: section of {source(cluster)} against this cluster (sinfo, "
                         "scontrol show partition)") from None


def _record_job(run: Run, job_id: str, folder: Path, **extra: str) -> None:
    # each launch has the whole of its restart budgets (resilience:), as on every backend
    run.update(job_id=job_id, job_ids=run.info().job_ids + [job_id], submitit_folder=str(folder),
               state="submitted", remove=("inplace_restarts", "inplace_stop"), **extra)


def _forget_unsubmitted(run: Run) -> None:
    """A run directory made by a launch that never got a job is removed: nothing stays behind."""
    info = run.info()
    if info.launches == 1 and not info.job_ids:
        shutil.rmtree(run.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- following
def _state(slurm_state: str, info: RunInfo) -> str:
    state = _STATE_NAMES.get(slurm_state, slurm_state.lower())
    if state in ("completed", "failed") and info.state == "stopped":
        return "stopped"  # past a requeue limit: stop_reason says which
    return state


def environment_checks(cluster: ClusterConfig) -> list[Check]:
    """`launcher doctor`: Slurm's commands on PATH, the controller answering, the partition."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        return [Check("Slurm", False, f"not on PATH: {', '.join(missing)}", "run the launcher on the cluster's "
                      "login node, or load Slurm's module / add its bin folder to PATH")]
    done, err = bounded(lambda: subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                               timeout=CHECK_TIMEOUT_S))
    if err is not None or done.returncode != 0:
        why = str(err) if err is not None else last_line(done.stderr)
        return [Check("Slurm", False, f"commands found, but the controller does not answer: {why}",
                      "check slurmctld (scontrol ping) and your Slurm configuration")]
    partitions = [p.rstrip("*") for p in done.stdout.split()]
    wanted = cluster.slurm.partition if cluster.slurm else None
    if wanted and wanted not in partitions:
        return [Check("Slurm", False, f"partition {wanted!r} not found (partitions: {', '.join(partitions)})",
                      "set slurm.partition in the cluster config to one of them")]
    return [Check("Slurm", True, f"{', '.join(SLURM_COMMANDS)} on PATH; controller answers; partitions: "
                  f"{', '.join(partitions)}")]


def status(run: Run) -> dict[str, Any]:
    """`state` is where the job is now, or how it ended; `history` what happened to it so far (requeues
    by kind, restarts), apart from any outcome; `outcome` (result.json) only once the run has ended and
    where it says more than the state (never beside `cancelled`, which is the whole story)."""
    info = run.info()
    job_id = info.job_id
    slurm_state = WATCHER.state(job_id) if job_id else UNKNOWN
    state = _state(slurm_state, info)
    out: dict[str, Any] = {"run": run.name, "state": state, "backend": "slurm", "job_id": job_id,
                           "slurm_state": slurm_state, "dir": str(run.dir)}
    history = {**info.requeues, **({"restarts": info.restarts} if info.restarts else {})}
    if history:
        out["history"] = ", ".join(f"{kind} {n}" for kind, n in history.items())
    if info.inplace_restarts:  # inside the allocation, by kind (jobs.environments.slurm_supervise)
        out["restarts"] = ", ".join(f"{kind} {n}" for kind, n in info.inplace_restarts.items())
    if info.stop_reason:
        out["stop_reason"] = info.stop_reason
    result = run.result() if state not in LIVE_STATES else None  # a result of a start that is over
    if result:
        shown = ("step", "epoch") if result.outcome == state or state == "cancelled" else ("step", "epoch", "outcome")
        out.update({**result.pick(*shown), **result.metrics})  # every val/* the recipe measures
    return out


def live(run: Run) -> Optional[str]:
    job_id = run.info().job_id
    if shutil.which("sacct") is None:
        raise UsageError(f"run {run.name} ({run.dir}) was submitted to Slurm as job {job_id}, and without `sacct` "
                         "on PATH this machine cannot tell whether it still runs", hint="launch it from the Slurm "
                         "login node, or choose another --run-name")
    state = status(run)["state"]
    return f"{state} as Slurm job {job_id} ({run.dir})" if state in LIVE_STATES else None


def cancel(run: Run) -> str:
    job_id = run.info().job_id
    if not job_id:
        return f"run {run.name} has no Slurm job"
    run.update(state="cancelled")  # before scancel: rank 0 then knows its SIGTERM is a cancel, not a preemption
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    return f"cancelled Slurm job {job_id} (run {run.name}); {what_a_stop_does(run)}"


def stacks(run: Run, dest: Path) -> dict[int, str]:
    """`python -m jobs.stacks` once on each node of the job, beside its ranks: `srun --overlap` runs a step in
    the running job's allocation without waiting for its resources."""
    info, cluster = run.info(), run.cluster()
    python = (cluster.slurm.python if cluster.slurm else None) or sys.executable
    command = node_command(python, run.dir, dest, run.recipe().parallel.nodes, info.job_id)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(CODE_ROOT), os.environ.get("PYTHONPATH"))))}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=STACKS_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise UsageError(f"run {run.name}: srun --overlap into job {info.job_id} did not answer in "
                         f"{STACKS_TIMEOUT_S} s") from None
    texts = read_answers(done.stdout)
    if not texts:
        raise UsageError(f"run {run.name}: no stacks from job {info.job_id}: srun said: "
                         f"{last_line(done.stderr)} (exit code {done.returncode})")
    return texts


def wait(runs: Sequence[Run]) -> dict[str, str]:
    """Until every run's job has stopped for good (requeues included); the states `status` reports."""
    final = wait_for_runs(runs)
    return {run.name: _state(final[run.name], run.info()) for run in runs}


def logs(run: Run, rank: int, follow: bool) -> int:
    return print_log(run, rank, follow, lambda: status(run)["state"] in LIVE_STATES)


# ----------------------------------------------------------------------------- a Bayesian sweep's workers
def launch_workers(recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, name: str, attempt: int,
                   workers: int, work_here: Callable[[int], int]) -> Launched:
    """A job array of `workers` elements, each a worker drawing trials from the study until the budget
    is spent (`launcher.sbatch.render_worker_array`); the script is kept in the sweep's folder."""
    from launcher.sbatch import render_worker_array

    python = (cluster.slurm.python if cluster.slurm else None) or sys.executable
    script = folder / f"workers-{attempt}.sh"
    write_private(script, render_worker_array(recipe, cluster, folder, workers, python))  # as sbatch.sh: setup lines
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused the workers of {name}: {errors.one_line(proc.stderr.strip(), 300)}",
                         hint=f"check the slurm: section of {source(cluster)} against this cluster (sinfo, "
                         "scontrol show partition)")
    array_id = proc.stdout.strip().split(";")[0]
    print(f"submitted Slurm job array {array_id} ({workers} workers) for {name}; script {script}", flush=True)
    return Launched(0, ended=False, batch_id=array_id)


def check_workers(recipe: RecipeConfig, cluster: ClusterConfig, workers: int) -> None:
    """Any number of workers: they queue for the cluster's cores."""


def study_uri(recipe: RecipeConfig, cluster: ClusterConfig, name: str) -> Optional[str]:
    """None: the journal file in the sweep's folder, which every worker shares."""
    return None


def run_trial_here(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """A trial, from its worker inside an array element: srun starts its ranks in the element's
    allocation, as `launcher sbatch`'s script does. USR2 and TERM to the worker go on to srun."""
    job_id = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    run.update(job_id=job_id, job_ids=[*run.info().job_ids, job_id], state="running")
    python = (cluster.slurm.python if cluster.slurm else None) or sys.executable
    child = subprocess.Popen(["srun", "--kill-on-bad-exit=1", python, "-u", "-m", ENTRY_MODULE, "--run-dir",
                              str(run.dir)])

    told: list[str] = []  # the stop this worker forwarded, if any: srun's SIGTERM after a rank died is none

    def forward(signum: int, _frame: Any) -> None:
        told.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    settle(run, told[0] if told else None, exit_code(code))  # what the study is told
    return run.info().exit_code or 0


def workers_live(array_id: str) -> bool:
    from launcher.backends.slurm_watch import read_states

    return any(_STATE_NAMES.get(s, s.lower()) in LIVE_STATES for s in read_states([array_id]).values())


def wait_workers(array_id: str, poll_s: float = 2.0) -> int:
    """Until every worker of the array has ended; 0 if they all completed."""
    import time

    from launcher.backends.slurm_watch import read_states

    while True:
        states = read_states([array_id])
        if states and not any(_STATE_NAMES.get(s, s.lower()) in LIVE_STATES for s in states.values()):
            return 0 if all(s == "COMPLETED" for s in states.values()) else 1
        time.sleep(poll_s)
