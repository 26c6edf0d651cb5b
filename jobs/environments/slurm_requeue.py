"""On Slurm the launcher is the one that requeues a `launcher run` script's job, even when the script's
framework requeues it itself (Lightning's SLURMEnvironment, submitit's checkpointing, a script's own
handler all run `scontrol requeue $SLURM_JOB_ID` after saving).

Why the launcher: rank 0 counts each requeue against slurm.max_preemptions / max_timeouts, records it
in run.json (what `launcher status` shows) and requeues once. A framework's requeue would bypass the
budgets and the records, and the two together could requeue the job twice.

How: while the script runs, `scontrol` on its PATH is this module (`stand_in`, a folder with one
`scontrol` file first on PATH). `scontrol requeue <this job>` does what Slurm's requeue does to the
running job, without the requeue: it notes the request in `<run>/requeue_asked/<job>.<restart>` and
sends SIGTERM to every task of the job (every rank's wrapper and script, on every node), so each
script stops as it would when Slurm requeues it. Rank 0's wrapper then counts and requeues the job
(jobs.environments.slurm). Every other scontrol command, and a requeue of another job, goes to the
real scontrol. The notice itself reaches the script in the signal it handles (jobs.script.Forwarder:
Lightning listens for SIGUSR1, the launcher's jobs get SIGUSR2).
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from jobs.schema.run_dir import REQUEUE_ASKED

STAND_IN = "scontrol"
PREFIX = "launcher-scontrol-"  # the stand-in's folder


@contextlib.contextmanager
def stand_in() -> Iterator[Path]:
    """PATH leads to the stand-in `scontrol` while the block runs (the script's environment is copied
    from this process's when it starts); the wrapper's own scontrol, after the block, is the real one."""
    saved = os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix=PREFIX) as folder:
        path = Path(folder) / STAND_IN
        path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {__name__} \"$@\"\n")
        path.chmod(0o755)
        os.environ["PATH"] = os.pathsep.join(p for p in (folder, saved) if p)
        try:
            yield path
        finally:
            os.environ["PATH"] = saved


def kill_wait() -> float:
    """Slurm's KillWait: how long a process has between the SIGTERM and the SIGKILL that end a job (30 s
    is Slurm's default, taken when scontrol cannot say)."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 30.0
    found = re.search(r"^KillWait\s*=\s*(\d+)", shown, re.MULTILINE)
    return float(found.group(1)) if found else 30.0


def attempt() -> str:
    """This start of the ranks (the key of their requeue requests and failure records): requeues keep the
    job id and count SLURM_RESTART_COUNT up; a restart inside the allocation counts RESTART_VAR up."""
    from jobs.script_start import RESTART_VAR

    inplace = os.environ.get(RESTART_VAR, "0")
    key = f"{os.environ.get('SLURM_JOB_ID', 'nojob')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return key if inplace == "0" else f"{key}.{inplace}"


def own_job_ids() -> set[str]:
    """The ids a script may give its own job: SLURM_JOB_ID, and ARRAYJOB_TASK for an array task (Lightning's)."""
    ids = {os.environ.get("SLURM_JOB_ID", "")}
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        ids.add(f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
    return ids - {""}


def asked(run_dir: Path) -> bool:
    """Whether the script asked this start of the job to be requeued (rank 0's wrapper asks after it)."""
    return (run_dir / REQUEUE_ASKED / attempt()).exists()


def _real_scontrol() -> str:
    """The first scontrol on PATH that is not a stand-in (a script started by a script keeps our folder)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not Path(p).name.startswith(PREFIX))
    found = shutil.which("scontrol", path=path)
    if found is None:
        raise SystemExit("scontrol: not found on PATH (the launcher's stand-in passes other commands on to it)")
    return found


def main(argv: list[str]) -> int:
    from jobs.script_start import RUN_DIR_VAR  # the script's run (its environment has it, the wrapper's not)

    if len(argv) == 2 and argv[0] == "requeue" and argv[1] in own_job_ids() and os.environ.get(RUN_DIR_VAR):
        return _requeue_asked(Path(os.environ[RUN_DIR_VAR]), argv[1])
    real = _real_scontrol()
    os.execv(real, [real, *argv])
    return 127  # not reached


def _requeue_asked(run_dir: Path, job: str) -> int:
    folder = run_dir / REQUEUE_ASKED
    folder.mkdir(parents=True, exist_ok=True)
    (folder / attempt()).write_text(f"scontrol requeue {job}\n")
    print(f"launcher: the script asked to requeue job {job}: every rank is stopped (SIGTERM, as Slurm's requeue "
          "would), then the launcher requeues the job once and counts it", flush=True)
    # This process is one of the job's: the SIGTERM it asks for reaches it too, and the script waits for it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = subprocess.run(["scancel", "--signal=TERM", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
