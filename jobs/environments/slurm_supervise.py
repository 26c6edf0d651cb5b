"""The batch step of a Slurm job: starts every rank with srun, watches them for a hang, and starts them
again inside the same allocation after a hang or a crash, while the recipe's `resilience:` budgets allow.

Both submit paths end their batch script with `exec python -m jobs.environments.slurm_supervise ...`
(`launcher sbatch`'s script after its setup lines, submitit's through its setup lines, so submitit's own
srun line never runs): one supervisor, one behaviour. It is the batch shell's process from then on, so
it receives what Slurm sends the batch shell:
- a notice (USR2 by `--signal=B:USR2@grace` in `launcher sbatch`'s script) is forwarded to srun, which
  forwards it to every rank (submitit's `--signal=USR2@grace` reaches the ranks directly: the
  supervisor only survives it);
- SIGTERM (scancel, `scontrol requeue`, the time limit) is forwarded to srun and ends the supervisor with
  srun's status: the job is ending, nothing is restarted.

After srun, in this order: a hang found by the watchdog (jobs.watchdog: every rank's stack dumped with
`srun --overlap` into logs/stacks/, then the step killed) or a crash (srun failed, nobody told the job
to stop) starts the ranks again from the newest committed checkpoint, counted in run.json's
`inplace_restarts`; past the budget, the job's crash path (`jobs.environments.slurm.after_srun`: a
failure counted against slurm.max_failures, then a requeue or the run stops). Only a lost node or a
preemption gives the allocation back."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Optional

from jobs import flight_recorder, stacks
from jobs.environments import slurm
from jobs.schema import RecipeConfig
from jobs.schema.run_dir import PROGRESS, Run
from jobs.script_start import RESTART_VAR
from jobs.watchdog import Hang, Watchdog, restart_in_place

POLL_S = 1.0
KILL_WAIT_S = 60.0  # after the step was told to die, srun gets this long before it is killed itself
STACKS_TIMEOUT_S = 60.0


class Told:
    """What Slurm told the batch step while srun ran: a stop (TERM) ends the job, a notice is passed on."""

    def __init__(self, forward_notices: bool) -> None:
        self.forward_notices = forward_notices
        self.terminated = False
        self.noticed = False
        self.child: Optional[subprocess.Popen] = None

    def install(self) -> "Told":
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            self.terminated = True
        else:
            self.noticed = True
            if not self.forward_notices:
                print(f"slurm supervisor: got {name} (Slurm sends it to the ranks themselves)", file=sys.stderr,
                      flush=True)
                return
        if self.child is None or self.child.poll() is not None:
            print(f"slurm supervisor: {name} before srun started", file=sys.stderr, flush=True)
            if signum == signal.SIGTERM:
                sys.exit(143)
            return
        print(f"slurm supervisor: {name}, forwarding to srun (pid {self.child.pid})", file=sys.stderr, flush=True)
        self.child.send_signal(signum)


def srun_command(run_dir: Optional[str], submitit_folder: Optional[Path]) -> list[str]:
    """The step that runs every rank: the rank entry of `launcher sbatch`, or submitit's own (its output
    files where submitit's srun line would put them)."""
    python = sys.executable
    if submitit_folder is None:
        return ["srun", "--kill-on-bad-exit=1", python, "-u", "-m", slurm.ENTRY_MODULE, "--run-dir", str(run_dir)]
    from submitit.core.utils import JobPaths

    output = str(JobPaths(folder=submitit_folder).stdout)
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        output = output.replace("%j", "%A_%a")  # as submitit names an array's files
    return ["srun", "--unbuffered", "--output", output, "--kill-on-bad-exit=1", python, "-u", "-m",
            "submitit.core._submit", str(submitit_folder)]


def supervise(run: Run, command: list[str], told: Told) -> int:
    """Run the step until it ends for good; the batch step's exit status."""
    recipe, restarts = run.recipe(), 0  # parsed once: every attempt runs the same recipe
    while True:
        status, hang = _attempt(run, recipe, command, told, restarts)
        print(f"slurm supervisor: srun exited with status {status}", file=sys.stderr, flush=True)
        if told.terminated:
            return status
        if hang is not None:
            if restart_in_place(run, recipe.resilient, "hangs", hang.short()):
                restarts += 1
                continue
            slurm.after_srun(run, why=hang.line())
            return status or 1
        if status == 0:
            return 0
        if not told.noticed and _ranks_crashed(run) and \
                restart_in_place(run, recipe.resilient, "crashes", slurm.crash_reason(run)):
            restarts += 1
            continue
        slurm.after_srun(run)  # count a failure, then requeue or stop (it checks the job was not ended)
        return status


def _ranks_crashed(run: Run) -> bool:
    """A failed step is a crash unless a rank already decided how this start ends (saved for a preemption,
    cancelled) or Slurm itself is ending the job."""
    return not slurm.decided(run.info()) and not slurm.slurm_ends_the_job()


def _attempt(run: Run, recipe: RecipeConfig, command: list[str], told: Told,
             restarts: int) -> tuple[int, Optional[Hang]]:
    """One start of the step: srun's exit status, and the hang that ended it, if any."""
    shutil.rmtree(run.dir / PROGRESS, ignore_errors=True)  # the previous attempt's reports
    ranks = recipe.parallel.nodes * recipe.parallel.procs_per_node
    watchdog = Watchdog(run, ranks, recipe.resilient.hang_timeout_s)
    # in this process's environment too: the failure records of the attempt are keyed by it (attempt())
    os.environ[RESTART_VAR] = str(restarts)
    told.child = subprocess.Popen(command)
    hang = None
    while True:
        try:
            code = told.child.wait(timeout=POLL_S)
            return (code if code >= 0 else 128 - code), hang  # killed by a signal: as a shell says it
        except subprocess.TimeoutExpired:
            pass
        if hang is None and not told.terminated and not told.noticed:
            hang = watchdog.check()
            if hang is not None:
                _end_hung_step(run, recipe.parallel.nodes, hang, told.child)


def _end_hung_step(run: Run, nodes: int, hang: Hang, child: subprocess.Popen) -> None:
    """Every rank's stack, from each node (`srun --overlap` beside the hung step), then the step killed:
    a hung rank would not act on a polite signal, and the others wait for it."""
    dest = run.stacks_dir(1 + sum(run.info().inplace_restarts.values()))  # numbered across the launch
    with flight_recorder.recording(run.dir, dest):  # each rank's last collectives beside its stack
        try:
            done = subprocess.run(stacks.node_command(sys.executable, run.dir, dest, nodes,
                                                      os.environ["SLURM_JOB_ID"]),
                                  capture_output=True, text=True, timeout=STACKS_TIMEOUT_S)
            found = stacks.read_answers(done.stdout)
        except (OSError, subprocess.SubprocessError, KeyError):
            found = {}
    where = f"stacks of ranks {', '.join(map(str, found))} in {dest.relative_to(run.dir)}/" if found else \
        "no stack could be taken (srun --overlap did not answer)"
    run.note(f"{hang.line()}; {where}")
    _kill_step(child)


def _kill_step(child: subprocess.Popen) -> None:
    """Two SIGINTs within a second make srun kill every task of its step (SIGKILL); srun itself is
    killed if the step has not ended after KILL_WAIT_S."""
    for _ in range(2):
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            time.sleep(0.3)
    try:
        child.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="the batch step of a Slurm job: srun, watch, restart in place")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir")
    where.add_argument("--submitit-folder", type=Path)
    parser.add_argument("--forward-notices", action="store_true",
                        help="pass USR1/USR2 on to srun (the batch script's --signal=B:...)")
    args = parser.parse_args(argv)
    told = Told(args.forward_notices).install()  # before anything slow: a TERM must not kill us unhandled
    run_dir = args.run_dir or slurm.submitted_run_dir(args.submitit_folder)
    return supervise(Run.at(run_dir), srun_command(run_dir, args.submitit_folder), told)


if __name__ == "__main__":
    sys.exit(main())
