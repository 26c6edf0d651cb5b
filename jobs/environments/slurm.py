"""Slurm, inside the job: every Slurm task is one rank; after a stop signal rank 0 requeues the job.

`rank_main` runs in every task (submitit unpickles and calls it; `launcher sbatch`'s script runs
`python -m jobs.environments.slurm --run-dir DIR` under srun). It maps Slurm's environment to
torchrun's variables (`torchrun_variables`, the one table for this scheduler), runs the trainer, and
on rank 0 decides whether to requeue after a stop signal. Every rank handles USR2 itself (Slurm
signals every task of the step); the ranks agree on a step, save together, flush the upload, then
rank 0 runs `scontrol requeue`. submitit's own USR2 handler (which requeues from inside the signal
handler, before any rank has saved) is replaced by the trainer's when training starts.

A crash is decided from the job's outcome, not from rank 0 alone: `srun --kill-on-bad-exit` ends
the step when any rank fails, often by killing rank 0 before it could count anything. So every
rank that raises writes `<run>/failures/<job>.<restart>.rank<N>`, and the batch script, after
srun returned non-zero without the job being told to stop, runs `--after-srun` (`after_srun`),
which counts one failure (the earliest rank's error as the reason) and requeues or stops the run.
Both batch scripts do this: submitit's in its teardown lines, `launcher sbatch`'s after its wait.
The control plane (`launcher.backends.slurm`) writes those command lines with `ENTRY_MODULE`.
"""
from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from jobs.environments import slurm_requeue
from jobs.environments.slurm_requeue import attempt
from jobs.progress import ProgressWriter
from jobs.schema.run_dir import FAILURES, RESULT_JSON, Run, RunInfo, RunResult
from jobs.schema import SlurmConfig

ENTRY_MODULE = "jobs.environments.slurm"  # `srun python -m ENTRY_MODULE ...`: every rank
SUPERVISOR = "jobs.environments.slurm_supervise"  # `exec python -m SUPERVISOR ...` ends both batch scripts
# torchrun variable -> submitit JobEnvironment attribute (submitit keeps the same kind of table)
ENV_MAP = {"RANK": "global_rank", "LOCAL_RANK": "local_rank", "WORLD_SIZE": "num_tasks"}


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
    """The function submitit runs in every task (and `python -m jobs.environments.slurm` under srun)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from jobs.script import Forwarder, ScriptFailed, run_script  # imported here: the --after-srun step needs neither

    # Not submitit.JobEnvironment(): that one only recognises Slurm inside submitit's own scripts
    # (SUBMITIT_EXECUTOR), and this entry also runs under a plain sbatch script's srun.
    job = SlurmJobEnvironment()
    os.environ.update(torchrun_variables(job))
    run = Run.at(run_dir)  # passed on below: each config file is parsed once in this task
    cluster = run.cluster()
    # every slurm.env entry, secret ones included: the batch scripts only export the non-secret ones
    os.environ.update((cluster.slurm or SlurmConfig()).env)
    # the hang watchdog sees this rank from its start (its CPU time, where it runs beside the supervisor)
    ProgressWriter(run.progress_file(job.global_rank)).started()
    started = time.time()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if job.global_rank == 0:
        begin_start(run, restarts)
    script = run.recipe().script is not None
    try:
        if script:  # `launcher run`: the user's script, in a child process (no torch in this one)
            forwarder = Forwarder(kill_after=slurm_requeue.kill_wait).install()
            with slurm_requeue.stand_in():  # the script's own `scontrol requeue` asks rank 0 to requeue
                result = run_script(run, forwarder=forwarder)
            if result.outcome == "failed":
                raise ScriptFailed(result.exit_code or 1)  # the task exits with the script's code
        else:
            from jobs.train import run_training  # torch: only where the trainer runs

            # a requeued job always continues its own checkpoints, even if launched with --resume never;
            # every rank derives this itself, so they all take the same (collective) resume path
            result = run_training(run, force_resume=restarts > 0)
    except BaseException:
        record_failure(run, job.global_rank, traceback.format_exc())
        raise
    if job.global_rank == 0:
        _after_run(run, cluster.slurm or SlurmConfig(), result, time.time() - started)
    if not script:
        from jobs.train import exit_cleanly

        atexit.register(exit_cleanly)  # runs after submitit has written its result file
    return result


def record_failure(run: Run, rank: int, error: str) -> None:
    """One file per failing rank (no shared file to lock); `after_srun` reads them."""
    folder = run.dir / FAILURES
    folder.mkdir(exist_ok=True)
    (folder / f"{attempt()}.rank{rank}").write_text(f"rank {rank}: {error.strip().splitlines()[-1]}\n")


def begin_start(run: Run, restarts: int) -> None:
    """Rank 0, as this start of the job begins: the previous start's result.json goes (its outcome is
    history now, in run.json's `requeues`), and a restart the launcher did not ask for is counted as an
    admin's `scontrol requeue` or a node failure. Each restart is a line in `launcher logs`."""
    info = run.info()
    counts = dict(info.requeues)
    if restarts > 0:
        (run.dir / RESULT_JSON).unlink(missing_ok=True)
        unexplained = restarts - sum(counts.values())  # the launcher counts its own before it requeues
        if unexplained > 0:
            kind = "node_failures" if _previous_start_state() == "NODE_FAIL" else "admin_requeues"
            counts[kind] = counts.get(kind, 0) + unexplained
            why = "after a node failure" if kind == "node_failures" else "requeued by an admin (scontrol requeue)"
        else:
            why = f"requeued by the launcher ({info.last_requeue})"
        run.note(f"{why}, restart {restarts} of job {os.environ.get('SLURM_JOB_ID', '?')}")
    run.update(state="running", restarts=restarts, requeues=counts, remove=("exit_code", "failed_rank"))


def _previous_start_state() -> str:
    """sacct's state of the job's previous start (REQUEUED after `scontrol requeue`, NODE_FAIL after a
    node failure); "" where sacct cannot tell."""
    try:
        rows = subprocess.run(["sacct", "-j", os.environ.get("SLURM_JOB_ID", ""), "--duplicates", "-X", "-n", "-P",
                               "-o", "State"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return (rows[-2].split() or [""])[0] if len(rows) >= 2 else ""  # "CANCELLED by 0": its first word


def after_srun(run: Run, why: Optional[str] = None) -> None:
    """After srun failed although the job was not told to stop (a rank crashed, or hung past the
    in-place budget: `why`), and no restart inside the allocation is left (jobs.environments.slurm_supervise).
    The run's ending is settled as failed (rank 0 may have taken srun's SIGTERM for a stop, or completed
    before another rank failed); one failure is counted for this start of the job, whichever rank it
    was, then the job is requeued or stopped."""
    from jobs.script import settle

    info = run.info()
    if decided(info):
        return  # rank 0 has already decided (a preemption), or finished and only the teardown failed
    if slurm_ends_the_job():
        return  # no crash: Slurm's own TERM (an admin's requeue, scancel) reached the ranks before this shell
    settle(run, None, info.exit_code or 1)
    _requeue_or_stop(run, run.cluster().slurm or SlurmConfig(), "failures", why or crash_reason(run))


def decided(info: RunInfo) -> bool:
    """Whether rank 0 already settled how this start ends (a preemption's requeue, a stop, a cancel), or
    finished and only the teardown failed: then a failed step is no crash."""
    return info.state in ("requeued", "stopped", "cancelled") or info.state == "completed" and info.failed_rank is None


def crash_reason(run: Run) -> str:
    """The earliest error a rank recorded in this attempt (`record_failure`)."""
    records = sorted((run.dir / FAILURES).glob(f"{attempt()}.rank*"), key=lambda p: p.stat().st_mtime_ns)
    return records[0].read_text().strip() if records else \
        "srun failed without a Python error on any rank (killed? see the job's output file)"


def slurm_ends_the_job() -> bool:
    """Whether Slurm itself is ending this job (`scontrol requeue`, scancel, the time limit, a node
    failure). Its SIGTERM reaches the ranks and this shell; under load srun may exit of it before
    this shell's own TERM arrives, which would look like a crash. A job whose rank crashed is still
    RUNNING while its batch shell runs this; one Slurm ends is not (REQUEUED, CANCELLED, TIMEOUT, ...)."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", os.environ.get("SLURM_JOB_ID", "")],
                               capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False  # cannot tell: count it as a crash, as before
    state = re.search(r"\bJobState=(\S+)", shown)
    return state is not None and state.group(1) != "RUNNING"


def _after_run(run: Run, cfg: SlurmConfig, result: RunResult, elapsed: float) -> None:
    from jobs.script import NOTICES  # Slurm's notices, as the script's wrapper forwards them

    if result.outcome == "completed":
        run.update(state="completed")
        return
    if run.info().state == "cancelled":  # `launcher cancel` said so before scancel: no requeue, no preemption
        from jobs.script import settle

        settle(run, result.signal or "SIGTERM", 0)
        return
    asked = slurm_requeue.asked(run.dir)  # the script's framework ran `scontrol requeue` (without a notice)
    if result.signal not in NOTICES and not asked:
        run.update(state="terminated")  # SIGTERM: scancel, or Slurm requeueing the job itself
        return
    kind = "timeouts" if _near_time_limit(cfg) else "preemptions"
    at = f" at step {result.step}" if result.step is not None else ""  # a script's result has no step
    why = f"{result.signal}{at}" if result.signal in NOTICES else "the script's scontrol requeue"
    _requeue_or_stop(run, cfg, kind, why)


_EVENTS = {"preemptions": "preempted", "timeouts": "near the time limit", "failures": "failed"}


def _requeue_or_stop(run: Run, cfg: SlurmConfig, kind: str, why: str) -> None:
    """Count preemptions, time-outs and failures separately; past its limit a job stops requeueing."""
    counts = dict(run.info().requeues)
    limit = {"preemptions": cfg.max_preemptions, "timeouts": cfg.max_timeouts, "failures": cfg.max_failures}[kind]
    if counts.get(kind, 0) >= limit:
        message = f"not requeued: {kind} limit of {limit} reached (slurm.max_{kind}); last: {why}"
        run.update(state="stopped", stop_reason=message)
        run.note(f"{_EVENTS[kind]} ({why}); {message}")
        print(message, file=sys.stderr, flush=True)
        return
    counts[kind] = counts.get(kind, 0) + 1
    # a failed script's exit code and rank belong to this start: the next one must not fail with them
    run.update(requeues=counts, state="requeued", last_requeue=why, remove=("exit_code", "failed_rank"))
    job_id = os.environ["SLURM_JOB_ID"]
    run.note(f"{_EVENTS[kind]} ({why}); requeueing job {job_id} ({kind} {counts[kind]}/{limit})")
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


def main(argv: list[str] | None = None) -> int:
    """`srun python -m jobs.environments.slurm --run-dir DIR`: the rank entry of standalone sbatch scripts;
    with `--after-srun`, the batch script's step after srun failed (the run from --run-dir, or for
    submitit's scripts from the job's pickle in --submitit-folder)."""
    import argparse

    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir")
    where.add_argument("--submitit-folder")
    parser.add_argument("--after-srun", action="store_true")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or submitted_run_dir(Path(args.submitit_folder))
    if args.after_srun:
        after_srun(Run.at(run_dir))
    else:
        rank_main(run_dir)
    return 0


def submitted_run_dir(folder: Path) -> str:
    """The run directory submitit's job was submitted with (one job array holds several runs)."""
    from submitit.core.utils import DelayedSubmission, JobPaths
    from submitit.slurm.slurm import SlurmJobEnvironment

    delayed = DelayedSubmission.load(JobPaths(folder, job_id=SlurmJobEnvironment().job_id).submitted_pickle)
    return str(delayed.args[0])


if __name__ == "__main__":
    sys.exit(main())
