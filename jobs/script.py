"""Rank entry of `launcher run`: `python -m jobs.script --run-dir RUN_DIR` runs the recipe's
`script:` on this rank (started by torchrun, srun or submitit, like `jobs.train`).

The script runs as a child process of this one, as torchrun would start it: the same interpreter,
torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
the run's code_dir first on the import path, and the LAUNCHER_* variables of `jobs.script_start` (the
run and checkpoint folders, which start of the run this is, whether it resumes), in its working
directory (script.workdir: the run's work/ folder, or code_dir), through `jobs/script_main.py`, which runs
it as `python` would and ends its process without the interpreter's teardown (see there why). A child
process, not `runpy` in this one, because the script owns its process: its signal handlers, its
`sys.exit` code, its crashes. This process stays in front of it:
- every line the script prints goes to `logs/rank<N>.log` and to this rank's console;
- a stop signal (SIGTERM, SIGINT, and Slurm's SIGUSR1/SIGUSR2 preemption notice) reaches the script
  as SIGTERM, the signal any script can handle (a notice as the notice signal the script handles);
  the one that came decides what happens next (on Slurm, a USR1/USR2 requeues the job);
- the exit code is the run's: a script that exits 3 fails the run with 3 (torchrun itself would
  report 1), recorded in run.json by the first rank that failed on its own;
- how the run ended is settled once every rank has exited (`settle`), by the one that knows whether
  the run was told to stop: a rank cannot tell a cancel from torchrun's SIGTERM after another rank died.

This module imports no torch: a rank wrapper costs a small Python process, not a second copy of torch.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import BinaryIO, Callable, Optional, Union

from jobs import stacks
from jobs.env import RankEnv
from jobs.progress import ProgressWriter
from jobs.preempt import STOP_SIGNALS
from jobs.schema import RecipeConfig
from jobs.schema.run_dir import ENDED_BY_STOP, LOGS, Run, RunResult
from jobs.schema.secrets import redact_args
from jobs.script_start import Start, begin

SCRIPT_MAIN = str(Path(__file__).with_name("script_main.py"))  # by path: a user's jobs/ folder cannot shadow it


class ScriptFailed(SystemExit):
    """The script exited non-zero on this rank: this process exits with the same code."""

    def __str__(self) -> str:
        return f"the script exited with code {self.code}"


def script_command(run: Run, recipe: RecipeConfig, start: Start) -> list[str]:
    script = recipe.script
    assert script is not None, "jobs.script runs recipes with a script: section"
    head = [script.path] if script.path else ["-m", script.module or ""]
    # -u: lines reach the log as they are printed; SCRIPT_MAIN runs it as python would, and ends the process
    # without the interpreter's teardown, where DDP's gloo threads can abort a finished script
    return [sys.executable, "-u", SCRIPT_MAIN, *head, *start.arguments(run, recipe)]


def child_environment(run: Run, code_dir: str, rank: RankEnv, start: Start) -> dict[str, str]:
    env = dict(os.environ)
    # One rank starts without torchrun, so nothing set its variables: set them as `torchrun
    # --nproc-per-node 1` would (env:// rendezvous needs every one), on a free port as --standalone does.
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", rank.rank), ("LOCAL_RANK", rank.local_rank), ("WORLD_SIZE", rank.world_size),
                       ("LOCAL_WORLD_SIZE", rank.local_world_size), ("MASTER_ADDR", rank.master_addr)):
        env.setdefault(key, str(value))
    env.update(start.environment(run))
    env.update(stacks.script_environment(run.dir, rank.rank))  # script_main registers the stack signal
    # NCCL's error handling as the recipe says, under torchrun (which sets 1) and srun (nothing) alike; the
    # collective timeout is the script's own init_process_group(timeout=...)
    env.update(run.recipe().parallel.rank_environment())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_dir, env.get("PYTHONPATH", "")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Forwarder:
    """The first stop signal to this process becomes one SIGTERM for the script, and is remembered.

    Only this process signals the script (it runs in its own session, so torchrun's SIGTERM to the
    rank's process group and a terminal's Ctrl-C do not reach it directly), and only once: Ctrl-C
    reaches this process and the launcher forwards it as well, and a second SIGTERM would run the
    script's handler again in the middle of its own cleanup, or kill it while it exits."""

    def __init__(self, kill_after: Union[float, Callable[[], float], None] = None) -> None:
        self.child: Optional[subprocess.Popen] = None
        self.signal_name: Optional[str] = None
        self._forwarded = False
        # On Slurm (its KillWait): a stop signal after the forwarded one is Slurm ending the job (a requeue,
        # scancel, the end of the grace period), which kills what still runs this long after its SIGTERM.
        # The script's own requeue never ends the job (jobs.environments.slurm_requeue): this does the kill.
        # A callable is asked only then, in the killing thread (Slurm's is `scontrol show config`: no rank
        # should pay for it at every start, nor a signal handler wait for it).
        self.kill_after = kill_after
        self._kill_timer: Optional[threading.Thread] = None

    def install(self) -> "Forwarder":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        again = self._forwarded
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self.forward()
        if again and self.kill_after is not None and self._kill_timer is None and self.child is not None:
            self._kill_timer = threading.Thread(target=_kill_after, args=(self.child, self.kill_after), daemon=True)
            _start_deaf(self._kill_timer)

    def forward(self) -> None:
        """SIGTERM to the script once a stop signal came (called again when the script has started);
        a Slurm notice (USR1/USR2) as the notice signal the script handles (`notice_for`), so the
        script knows a preemption from a cancel whichever signal reaches it first."""
        if self.signal_name and not self._forwarded and self.child is not None and self.child.poll() is None:
            self._forwarded = True
            self.child.send_signal(notice_for(self.child.pid, self.signal_name) or signal.SIGTERM)


NOTICES = ("SIGUSR1", "SIGUSR2")  # Slurm's preemption/time-limit notices (`--signal`)


def notice_for(pid: int, name: str) -> Optional[signal.Signals]:
    """The signal that carries Slurm notice `name` to process `pid`: the same one if it handles it (the
    runtime API handles both), else the other notice if it handles that one (Lightning's SLURMEnvironment
    listens for SIGUSR1, the launcher's jobs get SIGUSR2), else None (it gets SIGTERM)."""
    if name not in NOTICES:
        return None
    other = NOTICES[1 - NOTICES.index(name)]
    return next((signal.Signals[n] for n in (name, other) if catches(pid, n)), None)


def _kill_after(child: subprocess.Popen, delay: Union[float, Callable[[], float]]) -> None:
    time.sleep(delay() if callable(delay) else delay)
    if child.poll() is None:
        child.kill()


def catches(pid: int, name: str) -> bool:
    """Whether process `pid` has a handler for signal `name` (Linux: SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((ln for ln in status.splitlines() if ln.startswith("SigCgt:")), None)
    return line is not None and bool(int(line.split()[1], 16) >> (signal.Signals[name] - 1) & 1)


def _tee(source: BinaryIO, log: BinaryIO, prefix: bytes) -> None:
    """Copy the script's output, line by line, into the rank's log file and onto the console (with one
    `[rankN] ` prefix: torch prefixes its own lines `[rankN]: `, which the console shows as ours)."""
    console = sys.stdout.buffer
    own = prefix.rstrip() + b":" if prefix else b""
    for line in iter(source.readline, b""):
        log.write(line)
        log.flush()
        shown = line[len(own):].lstrip(b" ") if own and line.startswith(own) else line
        console.write(prefix + shown)
        console.flush()


def _say(log: BinaryIO, line: str) -> None:
    """A line of the launcher's own in the rank's log and on its console."""
    log.write(f"{line}\n".encode())
    print(line, flush=True)


def _start_deaf(thread: threading.Thread) -> None:
    """Start `thread` with the stop signals blocked in it. The kernel hands a signal to any thread that
    does not block it, and Python runs handlers only in the main thread: one taken by the copying
    thread would wait until the main thread wakes, which is when the script has exited (never, if
    the script waits for that signal). The new thread inherits the mask; this one restores its own."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if this wrapper dies (Linux), as jobs.train does for ranks."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _prepare_child() -> None:
    """In the child, before exec: follow this wrapper if it dies, and ignore SIGUSR2, the notice Slurm
    sends the launcher's jobs. Slurm signals every process of the step, the script too, and its default
    action ends a process: a script that handles only SIGTERM would die of the notice before the
    forwarded SIGTERM reaches it. An ignored signal stays ignored across exec; a script that handles it
    (the runtime API) still can. SIGUSR1 keeps its default: a framework installs its notice handler only
    on a signal nobody else handles (Lightning's SLURMEnvironment checks for SIG_DFL), and only a
    hand-made `scancel --signal=USR1` sends it to the script directly."""
    _die_with_parent()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def exit_code(returncode: int) -> int:
    """A process killed by signal N has exit code 128 + N, as a shell reports it."""
    return returncode if returncode >= 0 else 128 - returncode


def run_script(run: Run | Path, env: RankEnv | None = None, forwarder: Forwarder | None = None) -> RunResult:
    """Run the script on this rank until it exits; what result.json holds (written by rank 0). `run`: a
    Run another entry point has opened (its config.yaml maybe parsed already), or a run directory."""
    run = run if isinstance(run, Run) else Run.at(run)
    env = env or RankEnv.from_environ()
    env.check()
    forwarder = forwarder or Forwarder().install()
    recipe = run.recipe()
    code_dir = run.readable_info().code_dir or os.getcwd()
    start = begin(run, recipe, Path(code_dir))
    command = script_command(run, recipe, start)
    (run.dir / LOGS).mkdir(parents=True, exist_ok=True)
    with open(run.dir / LOGS / f"rank{env.rank}.log", "ab") as log:
        log.write(f"launcher: rank {env.rank} of {env.world_size} on {socket.gethostname()} (local rank "
                  f"{env.local_rank}), run {run.dir}, {start.described(recipe)}: "
                  f"{' '.join(redact_args(command[3:]))}\n".encode())  # the real ones: secrets.yaml
        if start.note and env.is_main:
            _say(log, f"launcher: {start.note}")
        log.flush()
        environ = child_environment(run, code_dir, env, start)
        child = subprocess.Popen(command, cwd=start.workdir, env=environ, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_prepare_child,
                                 start_new_session=True)  # signalled by the Forwarder only
        forwarder.child = child
        stacks.record(run.dir, env.rank, child.pid)  # the script's process is the rank `launcher stacks` reads
        ProgressWriter(run.progress_file(env.rank), child.pid).started()  # the watchdog's pid to watch and dump
        forwarder.forward()  # a stop that arrived while the script was starting
        prefix = f"[rank{env.rank}] ".encode() if env.distributed else b""
        copier = threading.Thread(target=_tee, args=(child.stdout, log, prefix), daemon=True)
        _start_deaf(copier)
        code = exit_code(child.wait())
        copier.join()
    return _outcome(run, env, code, forwarder.signal_name)


def _outcome(run: Run, env: RankEnv, code: int, stop_signal: Optional[str]) -> RunResult:
    """This rank's ending. A stop signal is taken for a stop here (a rank cannot tell a cancel from
    torchrun's or srun's SIGTERM after another rank died): whoever knows whether the run was told to
    stop (the local launcher, Slurm's after-srun step) settles it afterwards (`settle`)."""
    if stop_signal:  # told to stop: whatever the script did with the SIGTERM, the run was stopped
        cancelled = run.info().state == "cancelled"  # `launcher cancel` says so before it signals
        result = RunResult(outcome="cancelled" if cancelled else "preempted", signal=stop_signal,
                           exit_code=signal_status(stop_signal))
    elif code == 0:
        result = RunResult(outcome="completed", exit_code=0)
    else:  # failed on its own: the first such rank names the run's exit code (torchrun's would be 1)
        run.update(unless_set={"exit_code": code, "failed_rank": env.rank})
        result = RunResult(outcome="failed", exit_code=code)
    if env.is_main:
        info = run.info()
        if result.outcome != "failed" and info.failed_rank is not None:  # another rank failed first
            result = RunResult(outcome="failed", exit_code=info.exit_code)
        run.write_result(result)
    return result


def signal_status(name: str) -> int:
    """The exit status of a process ended by signal `name`, as a shell reports it: 128 + its number."""
    return 128 + int(signal.Signals[name])


def settle(run: Run, stop: Optional[str], status: int) -> RunResult:
    """The run's one ending once every rank has exited, written to result.json and run.json (state,
    exit_code): what `launcher status`, the console and a sweep's study are told.

    `stop`: the stop signal the launcher itself was told and forwarded (`launcher cancel`, Ctrl-C, a
    notice), None if nobody told the run to stop; `status`: the ranks' exit status as the launcher saw
    it (torchrun's: a failed rank's own status, `jobs.torchrun`). A rank that failed on its own, or any
    non-zero status without a stop, fails the run, whatever rank 0 wrote: rank 0 takes torchrun's
    SIGTERM after another rank died for a stop, and a script's ranks end on their own (rank 0 may have
    written `completed` before another failed). A stopped run is `cancelled` after `launcher cancel`
    (run.json's state says so before the signal is sent), else `preempted`."""
    result, info = run.result(), run.info()
    script = result.exit_code is not None or info.failed_rank is not None or _is_script(run)
    if info.failed_rank is not None:
        ended, code = "failed", info.exit_code or status or 1
    elif stop is None and (status != 0 or result.outcome not in ("completed", "pruned")):
        ended, code = "failed", status or (result.exit_code if result.outcome == "failed" else None) or 1
    elif stop is not None and not (result.outcome in ("completed", "pruned") and status == 0):
        ended, code = ("cancelled" if info.state == "cancelled" else "preempted"), signal_status(stop)
    else:
        ended, code = result.outcome, status
    if ended != result.outcome or (script and result.exit_code != code):
        if result or script:  # a trainer that crashed wrote nothing: run.json alone says how it ended
            result = RunResult.from_dict({**result.to_dict(), "outcome": ended,
                                          "signal": stop if ended in ENDED_BY_STOP else None,
                                          **({"exit_code": code} if script else {})})
            run.write_result(result)
    run.update(state=ended, exit_code=code)
    return result


def _is_script(run: Run) -> bool:
    try:
        return run.recipe().script is not None
    except Exception:  # noqa: BLE001 - a config that cannot be read: not a script run as far as we know
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run_script(args.run_dir.resolve())
    return (result.exit_code or 1) if result.outcome == "failed" else 0


if __name__ == "__main__":
    _die_with_parent()  # torchrun starts ranks in their own sessions: follow it if it is killed
    sys.exit(main())
