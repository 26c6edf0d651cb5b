"""Slurm backend through submitit: one Slurm task per rank, preemption -> save -> requeue -> resume.

Control plane (on the login node): `check`, `launch`, `status`, `cancel`.
Rank side (inside each Slurm task): `rank_main` maps Slurm's environment to torchrun's variables
(`torchrun_variables`, the one table for this scheduler), runs the trainer, and on rank 0 decides
whether to requeue after a stop signal. Every rank handles USR2 itself (Slurm signals every task of
the step); the ranks agree on a step, save together, flush the upload, then rank 0 runs `scontrol
requeue`. submitit's own USR2 handler (which requeues from inside the signal handler, before any
rank has saved) is replaced by the trainer's when training starts.

A crash is decided from the job's outcome, not from rank 0 alone: `srun --kill-on-bad-exit` ends
the step when any rank fails, often by killing rank 0 before it could count anything. So every
rank that raises writes `<run>/failures/<job>.<restart>.rank<N>`, and the batch script, after
srun returned non-zero without the job being told to stop, runs `--after-srun` (`after_srun`),
which counts one failure (the earliest rank's error as the reason) and requeues or stops the run.
Both paths do this: submitit's script in its teardown lines, `launcher sbatch`'s after its wait.

The batch shell must outlive a signal sent to the whole job (`scancel --full --signal=USR2`, as
some preemption setups do): submitit's script gets a trap for USR1/USR2 (srun in the batch step
forwards the signal to the ranks itself); `launcher sbatch`'s script already forwards them.
"""
from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from schema import errors
from schema import ClusterConfig, RecipeConfig, SlurmConfig, load_resolved
from schema.errors import UsageError
from schema.run_dir import Run, RunResult
from launcher.slurm_options import check_cluster, env_exports, one_line, resource_options, setup_lines, source

# torchrun variable -> submitit JobEnvironment attribute (submitit keeps the same kind of table)
ENV_MAP = {"RANK": "global_rank", "LOCAL_RANK": "local_rank", "WORLD_SIZE": "num_tasks"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


# ----------------------------------------------------------------------------- rank side
def master_port(job_id: str) -> int:
    """Same on every task of a job, different between concurrent jobs on one node."""
    return 20000 + int(job_id.split("_")[0]) % 20000


def torchrun_variables(job: Any) -> dict[str, str]:
    """Slurm task (via submitit's JobEnvironment) -> the variables `jobs.env.RankEnv` reads."""
    out = {key: str(getattr(job, attr)) for key, attr in ENV_MAP.items()}
    out["LOCAL_WORLD_SIZE"] = str(job.num_tasks // job.num_nodes)
    out["MASTER_ADDR"] = job.hostnames[0]
    out["MASTER_PORT"] = str(master_port(os.environ.get("SLURM_JOB_ID", job.raw_job_id)))
    return out


def rank_main(run_dir: str) -> RunResult:
    """The function submitit runs in every task (and `python -m launcher.backends.slurm` under srun)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from jobs.train import exit_cleanly, run_training  # imported here: the control plane never loads torch

    # Not submitit.JobEnvironment(): that one only recognises Slurm inside submitit's own scripts
    # (SUBMITIT_EXECUTOR), and this entry also runs under a plain sbatch script's srun.
    job = SlurmJobEnvironment()
    os.environ.update(torchrun_variables(job))
    run = Run(Path(run_dir).name, Path(run_dir))
    cluster = load_resolved(run.dir / "cluster.yaml", ClusterConfig)
    # every slurm.env entry, secret ones included: the batch scripts only export the non-secret ones
    os.environ.update((cluster.slurm or SlurmConfig()).env)
    started = time.time()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if job.global_rank == 0:
        run.update(state="running", restarts=restarts)
    try:
        # a requeued job always continues its own checkpoints, even if launched with --resume never;
        # every rank derives this itself, so they all take the same (collective) resume path
        result = run_training(run.dir, force_resume=restarts > 0)
    except BaseException:
        record_failure(run, job.global_rank, traceback.format_exc())
        raise
    if job.global_rank == 0:
        _after_run(run, cluster.slurm or SlurmConfig(), result, time.time() - started)
    atexit.register(exit_cleanly)  # runs after submitit has written its result file
    return result


def _attempt() -> str:
    """This start of the job: requeues keep the job id and count SLURM_RESTART_COUNT up."""
    return f"{os.environ.get('SLURM_JOB_ID', 'nojob')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def record_failure(run: Run, rank: int, error: str) -> None:
    """One file per failing rank (no shared file to lock); `after_srun` reads them."""
    folder = run.dir / "failures"
    folder.mkdir(exist_ok=True)
    (folder / f"{_attempt()}.rank{rank}").write_text(f"rank {rank}: {error.strip().splitlines()[-1]}\n")


def after_srun(run: Run) -> None:
    """In the batch shell, after srun failed although the job was not told to stop: a rank crashed.
    Count one failure for this start of the job, whichever rank it was, then requeue or stop."""
    if run.info().state in ("requeued", "stopped", "completed", "cancelled"):
        return  # rank 0 has already decided (a preemption), or finished and only the teardown failed
    records = sorted((run.dir / "failures").glob(f"{_attempt()}.rank*"), key=lambda p: p.stat().st_mtime_ns)
    why = records[0].read_text().strip() if records else \
        "srun failed without a Python error on any rank (killed? see the job's output file)"
    cluster = load_resolved(run.dir / "cluster.yaml", ClusterConfig)
    _requeue_or_stop(run, cluster.slurm or SlurmConfig(), "failures", why)


def _after_run(run: Run, cfg: SlurmConfig, result: RunResult, elapsed: float) -> None:
    if result.outcome == "completed":
        run.update(state="completed")
        return
    if result.signal not in ("SIGUSR1", "SIGUSR2"):
        run.update(state="terminated")  # SIGTERM: scancel, or Slurm requeueing the job itself
        return
    kind = "timeouts" if _near_time_limit(cfg) else "preemptions"
    _requeue_or_stop(run, cfg, kind, f"{result.signal} at step {result.step}")


def _requeue_or_stop(run: Run, cfg: SlurmConfig, kind: str, why: str) -> None:
    """Count preemptions, time-outs and failures separately; past its limit a job stops requeueing."""
    counts = dict(run.info().requeues)
    limit = {"preemptions": cfg.max_preemptions, "timeouts": cfg.max_timeouts, "failures": cfg.max_failures}[kind]
    if counts.get(kind, 0) >= limit:
        message = f"not requeued: {kind} limit of {limit} reached (slurm.max_{kind}); last: {why}"
        run.update(state="stopped", stop_reason=message)
        print(message, file=sys.stderr, flush=True)
        return
    counts[kind] = counts.get(kind, 0) + 1
    run.update(requeues=counts, state="requeued", last_requeue=why)
    job_id = os.environ["SLURM_JOB_ID"]
    print(f"requeueing job {job_id} ({kind} {counts[kind]}/{limit}): {why}", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)


def _near_time_limit(cfg: SlurmConfig) -> bool:
    """A USR2 within the grace period (plus a margin) of the time limit is a time-out, else a preemption."""
    left = subprocess.run(["squeue", "-h", "-j", os.environ.get("SLURM_JOB_ID", ""), "-o", "%L"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    return _seconds(left) <= cfg.grace_period_s + 60 if left else False


def _seconds(slurm_time: str) -> int:
    """`[days-]hh:mm:ss`, `mm:ss` or `INVALID`/`UNLIMITED` -> seconds (a large number for unlimited)."""
    if not slurm_time or not slurm_time[0].isdigit():
        return 10 ** 9
    days, _, rest = slurm_time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


# ----------------------------------------------------------------------------- control plane
def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    """Everything a job script is made of, checked before a run directory exists (exit 2, nothing written)."""
    check_cluster(recipe, cluster)
    if shutil.which("sbatch") is None:
        raise UsageError(f"cluster config {cluster.name!r} uses Slurm but `sbatch` is not on PATH",
                         hint="run this on a Slurm login node (for the local test Slurm: make slurm-up)")


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
_SUBMITIT_NAMED = {"partition", "account", "qos", "time", "nodes", "ntasks_per_node", "cpus_per_task",
                   "gpus_per_node", "mem", "constraint", "exclusive"}


def executor_parameters(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> dict[str, Any]:
    """submitit's parameters from the options `launcher sbatch` also uses (launcher.slurm_options)."""
    s, src = cluster.slurm or SlurmConfig(), source(cluster)
    params: dict[str, Any] = {
        "job_name": _for_sbatch(one_line("command line", "run name", run.name)),
        "signal_delay_s": s.grace_period_s, "stderr_to_stdout": True,
        "setup": _SURVIVE_SIGNALS + env_exports(src, s) + setup_lines(src, s),
        # one rank dying must end the step, not leave the others blocked in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True},
    }
    for _, option, value in resource_options(recipe, s, src):
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


def _after_srun_lines(python: str, folder: Path) -> list[str]:
    """submitit's teardown: runs after srun, where `$?` is still srun's status. On TERM (scancel,
    requeue, time limit) this shell dies at once, so only a crash of a rank gets here."""
    command = " ".join(shlex.quote(a) for a in [python, "-u", "-m", "launcher.backends.slurm",
                                                "--after-srun", "--submitit-folder", str(folder)])
    return ["status=$?",
            "# srun failed and the job was not told to stop: a rank crashed; count it, requeue or stop",
            f'if [ "$status" -ne 0 ]; then {command} || true; fi',
            'exit "$status"']


def make_executor(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, folder: Path) -> Any:
    import submitit

    src = source(cluster)
    python = one_line(src, "slurm.python", (cluster.slurm.python if cluster.slurm else None) or sys.executable)
    _check_folder(folder)
    # submitit puts `python` into the command line as given: quote it here
    executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python))
    executor.update_parameters(**executor_parameters(recipe, cluster, run), teardown=_after_srun_lines(python, folder))
    return executor


def _check_folder(folder: Path) -> None:
    """submitit writes the folder into `#SBATCH --output=` (where sbatch expands %-patterns and
    eats backslashes) and into command lines: it must be one plain line."""
    one_line("command line", "run directory (--runs-dir, --run-name)", str(folder))
    if "%" in str(folder) or "\\" in str(folder):
        raise UsageError(f"run directory {str(folder)!r} contains '%' or '\\', which sbatch would expand in "
                         "the job's output path", hint="choose a run name and runs directory without them")


def launch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, wait: bool = False) -> int:
    # A folder per launch: Slurm job ids repeat after a controller reset, and a stale result
    # file of an older job with the same id must never be read back.
    from submitit.core.utils import FailedJobError

    folder = run.dir / "submitit" / f"launch-{run.info().launches or 1}"
    try:
        job = make_executor(recipe, cluster, run, folder).submit(rank_main, str(run.dir))
    except FailedJobError as err:  # sbatch refused: the config asks for something this cluster does not have
        _forget_unsubmitted(run)
        raise UsageError(f"sbatch refused the job of run {run.name}: {errors.one_line(str(err).strip(), 300)}",
                         hint=f"check the slurm: section of {source(cluster)} against this cluster (sinfo, "
                         "scontrol show partition)") from None
    jobs = run.info().job_ids + [job.job_id]
    run.update(job_id=job.job_id, job_ids=jobs, submitit_folder=str(folder), state="submitted")
    print(f"submitted Slurm job {job.job_id} for run {run.name} (logs: launcher logs {run.name})", flush=True)
    return wait_for(run) if wait else 0


def _forget_unsubmitted(run: Run) -> None:
    """A run directory made by a launch that never got a job is removed: nothing stays behind."""
    info = run.info()
    if info.launches == 1 and not info.job_ids:
        shutil.rmtree(run.dir, ignore_errors=True)


def sacct_state(job_id: str) -> str:
    """The job's state from sacct (squeue for jobs accounting has not seen yet)."""
    lines = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True,
                           text=True, timeout=60).stdout.split("\n")
    lines = [line for line in lines if line.strip()]
    if lines:
        return lines[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                            timeout=60).stdout.split()
    if queued:
        return queued[0]
    if "_" in job_id:  # an array element that never started has no row of its own
        return array_states(job_id.split("_")[0]).get(job_id, "UNKNOWN")
    return "UNKNOWN"


def array_states(array_id: str) -> dict[str, str]:
    """Slurm state of every element of a job array, `<array>_<i>` -> state, in one sacct call.

    Needed because `sacct -j 15_0` returns nothing for an element cancelled (or failed) while still
    pending: sacct keeps such elements as one row, `15_[0-3%4]`. squeue fills in what sacct has not
    seen yet (it lags behind a fresh submission)."""
    out: dict[str, str] = {}
    rows = subprocess.run(["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                          text=True, timeout=60).stdout.splitlines()
    for row in rows:
        job, _, state = row.partition("|")
        for element in expand_job_ids(job.strip()):
            out[element] = (state.split() or ["UNKNOWN"])[0]  # "CANCELLED by 0" -> CANCELLED
    queued = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T"], capture_output=True, text=True,
                            timeout=60).stdout.splitlines()
    for row in queued:
        job, _, state = row.partition("|")
        out.setdefault(job.strip(), state.strip() or "UNKNOWN")
    return out


def expand_job_ids(job: str) -> list[str]:
    """sacct's array notation -> element ids: `15_[0-2,5%4]` -> 15_0 15_1 15_2 15_5; `9_1` -> 9_1."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    ids = []
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        ids += [f"{match.group(1)}_{i}" for i in range(int(first), int(last or first) + 1)]
    return ids


def wait_for(run: Run, poll_s: float = 2.0) -> int:
    """Block until the job stops for good, requeues included; 0 if the run completed."""
    job_id = run.info().job_id
    while True:
        state = sacct_state(job_id)
        # rank 0 marks "requeued" before `scontrol requeue`; the job runs again and marks "running"
        if state in TERMINAL and run.info().state != "requeued":
            break
        time.sleep(poll_s)
    outcome = run.result().outcome
    print(f"Slurm job {job_id}: {state}, run {run.info().state}", flush=True)
    return 0 if state == "COMPLETED" and outcome == "completed" else 1


def status(run: Run) -> dict[str, Any]:
    info = run.info()
    job_id = info.job_id
    slurm_state = sacct_state(job_id) if job_id else "UNKNOWN"
    result = run.result()
    state = {"RUNNING": "running", "PENDING": "pending", "REQUEUED": "requeued", "COMPLETED": "completed",
             "CANCELLED": "cancelled", "FAILED": "failed", "TIMEOUT": "timeout"}.get(slurm_state.split()[0],
                                                                                     slurm_state.lower())
    if state in ("completed", "failed") and info.state == "stopped":
        state = "stopped"  # past a requeue limit: stop_reason says which
    out: dict[str, Any] = {"run": run.name, "state": state, "backend": "slurm", "job_id": job_id,
                           "slurm_state": slurm_state, "dir": str(run.dir),
                           "requeues": info.requeues}
    if info.stop_reason:
        out["stop_reason"] = info.stop_reason
    out.update({k: v for k, v in result.to_dict().items() if v is not None and k in ("step", "epoch", "val/acc", "val/loss", "outcome")})
    return out


def cancel(run: Run) -> str:
    job_id = run.info().job_id
    if not job_id:
        return f"run {run.name} has no Slurm job"
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    run.update(state="cancelled")
    return f"cancelled Slurm job {job_id} (run {run.name}); its ranks save a checkpoint on SIGTERM"


def main(argv: list[str] | None = None) -> int:
    """`srun python -m launcher.backends.slurm --run-dir DIR`: the rank entry of standalone sbatch scripts;
    with `--after-srun`, the batch script's step after srun failed (the run from --run-dir, or for
    submitit's scripts from the job's pickle in --submitit-folder)."""
    import argparse

    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir")
    where.add_argument("--submitit-folder")
    parser.add_argument("--after-srun", action="store_true")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or _submitted_run_dir(Path(args.submitit_folder))
    if args.after_srun:
        after_srun(Run(Path(run_dir).name, Path(run_dir)))
    else:
        rank_main(run_dir)
    return 0


def _submitted_run_dir(folder: Path) -> str:
    """The run directory submitit's job was submitted with (one job array holds several runs)."""
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    delayed = DelayedSubmission.load(JobPaths(folder, job_id=SlurmJobEnvironment().job_id).submitted_pickle)
    return str(delayed.args[0])


if __name__ == "__main__":
    sys.exit(main())
