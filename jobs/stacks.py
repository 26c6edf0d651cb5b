"""Where each rank is, now: every rank's Python stack, read from outside its process (`launcher stacks`, the
hang watchdog), torch-free.

Two ways to read a stack, the first that works:
- py-spy (`py-spy dump --pid P`) reads the process's memory through ptrace: it needs nothing from the process,
  works while it is stuck in native code (a collective, a read on a dead mount) and pauses it only briefly;
- faulthandler: every rank registers STACK_SIGNAL at start (`install`), and on that signal the interpreter's
  C handler appends every thread's stack to `<run>/logs/stacks/rank<N>.txt`, even while the main thread is
  blocked in C. The fallback where py-spy is missing or ptrace is refused (many clusters set
  kernel.yama.ptrace_scope or drop CAP_SYS_PTRACE in containers).

Each rank records its process (pid, start time, host) in `<run>/ranks/rank<N>.json`, so a node can find its
own ranks: `python -m jobs.stacks --run-dir RUN --dest DIR` dumps the ranks of the host it runs on and prints
one JSON line (what `launcher stacks` runs on each Slurm node through `srun --overlap`, and over SSH on VMs).
How the stacks read: `jobs.stack_report` (`group` is re-exported here).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional

from jobs import flight_recorder
from jobs.schema.run_dir import LOGS, RANKS, STACKS
from jobs.schema.run_files import replace_text
from jobs.stack_report import add_source, group

__all__ = ["STACK_SIGNAL", "install", "dump", "save", "group", "record", "local_ranks", "script_environment",
           "read_answers", "dump_folder"]

# A real-time signal: the trainer takes SIGUSR1/SIGUSR2/SIGTERM/SIGINT for stops (jobs.preempt), Slurm and
# torchrun send those, and the classic signals left all mean something else (SIGQUIT dumps core, SIGWINCH
# and SIGCHLD are sent by terminals and children). Nothing here sends SIGRTMIN+5; SIGRTMIN itself is what
# timer libraries pick by habit. Its default action ends a process, so `dump` sends it only to a process
# whose signal mask shows a handler (`_catches`).
STACK_SIGNAL: Optional[int] = int(signal.SIGRTMIN) + 5 if hasattr(signal, "SIGRTMIN") else None
# "0": never use py-spy (the faulthandler path, as where ptrace is refused); how tests take that path
PY_SPY_ENV = "LAUNCHER_STACKS_PY_SPY"
# `launcher run`: how the script's own process (jobs/script_main.py, which imports none of ours) registers
STACK_FILE_ENV, STACK_SIGNAL_ENV = "LAUNCHER_STACK_FILE", "LAUNCHER_STACK_SIGNAL"
_OPEN: list[IO[str]] = []  # the files faulthandler writes to: open for the life of the process


def stack_file(run_dir: Path, rank: int) -> Path:
    """Where rank `rank`'s faulthandler appends its stacks."""
    return run_dir / LOGS / STACKS / f"rank{rank}.txt"


def dump_folder(run_dir: Path) -> Path:
    """A new folder's path for one dump of every rank, named by the time: `<run>/logs/stacks/20261207-143501`
    (`-2`, `-3`, ... after a name taken in the same second)."""
    base = run_dir / LOGS / STACKS / time.strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def install(run_dir: Path, rank: int) -> None:
    """In a rank's own process, at its start: faulthandler dumps every thread on STACK_SIGNAL, the flight
    recorder is on, and the rank's record names this process."""
    for key, value in flight_recorder.environment(run_dir).items():
        os.environ.setdefault(key, value)
    if STACK_SIGNAL is not None:
        path = stack_file(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "a")  # noqa: SIM115 - faulthandler writes to its descriptor until the process ends
        _OPEN.append(out)
        faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=False)
    record(run_dir, rank, os.getpid())


def script_environment(run_dir: Path, rank: int) -> dict[str, str]:
    """What the script's process needs to register the same handler itself (jobs/script_main.py), and the
    flight recorder's settings (unless the user's environment has its own)."""
    recorder = {k: v for k, v in flight_recorder.environment(run_dir).items() if k not in os.environ}
    if STACK_SIGNAL is None:
        return recorder
    stack_file(run_dir, rank).parent.mkdir(parents=True, exist_ok=True)
    return {**recorder, STACK_FILE_ENV: str(stack_file(run_dir, rank)), STACK_SIGNAL_ENV: str(int(STACK_SIGNAL))}


def record(run_dir: Path, rank: int, pid: int) -> None:
    """`<run>/ranks/rank<N>.json`: the process that runs rank `rank` on this host (the script's own process
    under `launcher run`, recorded by its wrapper), with its start time so a reused pid is never taken for it."""
    folder = run_dir / RANKS
    folder.mkdir(parents=True, exist_ok=True)
    data = {"rank": rank, "pid": pid, "pid_start": process_start(pid), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    replace_text(folder / f"rank{rank}.json", json.dumps(data) + "\n")


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot; None once it has ended or where unknown
    (the same reading as launcher.backends.process_start, which the jobs plane cannot import)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def local_ranks(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the ranks recorded on this host whose process still runs (same pid, same start time)."""
    found = {}
    for path in sorted((run_dir / RANKS).glob("rank*.json")):
        try:
            data = json.loads(path.read_text())
            rank, pid, start, host = int(data["rank"]), int(data["pid"]), data.get("pid_start"), data["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half a record or a damaged one: that rank is not found, nothing fails
        if host == socket.gethostname() and pid > 0 and process_start(pid) == start:
            found[rank] = pid
    return found


# ----------------------------------------------------------------------------- reading stacks
def dump(pids: dict[int, int], dest: Path, timeout_s: float = 20.0, *,
         py_spy: Optional[bool] = None) -> dict[int, str]:
    """rank -> the Python stack of each process in `pids` (rank -> pid, on this host), also written to
    `dest/rank<N>.txt`. py-spy where it works (`py_spy=False` or LAUNCHER_STACKS_PY_SPY=0: never), else
    STACK_SIGNAL and what faulthandler appended. Bounded by `timeout_s` overall; a process that is gone or
    cannot be read gets a line that says so instead of a stack."""
    deadline = time.monotonic() + timeout_s
    texts = {r: f"no stack: process {p} is not running\n" for r, p in pids.items() if process_start(p) is None}
    alive = {r: p for r, p in pids.items() if r not in texts}
    tool = _py_spy() if py_spy is not False and os.environ.get(PY_SPY_ENV) != "0" else None
    failed: dict[int, str] = {}
    if tool and alive:
        # py-spy gets 40% of the time, the signal path the next 40%, the source lines what is left
        spied, failed = _with_py_spy(tool, alive, time.monotonic() + 0.4 * timeout_s)
        texts.update(spied)
    rest = {r: p for r, p in alive.items() if r not in texts}
    if rest:
        for rank, text in _with_faulthandler(rest, deadline - 0.2 * timeout_s).items():
            texts[rank] = (f"py-spy: {failed[rank]}\n" if rank in failed and text.startswith("no stack") else "") + text
    texts = _with_source(texts, deadline)
    save(texts, dest)
    return dict(sorted(texts.items()))


def save(texts: dict[int, str], dest: Path, replace: bool = True) -> None:
    """Each rank's stack as `dest/rank<N>.txt`; `replace=False` keeps a rank's file already there (the VM
    supervisor gathers every node's dumps into node 0's folder, where node 0's own agent wrote its ranks')."""
    dest.mkdir(parents=True, exist_ok=True)
    for rank, text in texts.items():
        if replace or not (dest / f"rank{rank}.txt").exists():
            (dest / f"rank{rank}.txt").write_text(text)


def _with_source(texts: dict[int, str], deadline: float) -> dict[int, str]:
    """Each text with the source lines of its user frames, read here where the code is, in a thread given
    what is left of the time (at least a second): code on a mount that stopped answering must not hang this."""
    done: dict[int, str] = {}

    def read() -> None:
        for rank, text in texts.items():
            done[rank] = add_source(text)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(1.0, deadline - time.monotonic()))
    return {rank: done.get(rank, text) for rank, text in texts.items()}


def _py_spy() -> Optional[str]:
    """py-spy's binary: beside this interpreter (a virtual environment's bin/, where pip puts it), else PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def _with_py_spy(tool: str, pids: dict[int, int], deadline: float) -> tuple[dict[int, str], dict[int, str]]:
    """(rank -> stack, rank -> why not) from one py-spy per process, all at once."""
    procs = {r: subprocess.Popen([tool, "dump", "--full-filenames", "--pid", str(p)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
             for r, p in pids.items()}  # a session each: one that hangs is killed with whatever it started
    texts, failed = {}, {}
    for rank, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            proc.communicate()
            failed[rank] = "timed out"
            continue
        if proc.returncode == 0 and out.strip():
            texts[rank] = out
        else:
            failed[rank] = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
    return texts, failed


def _with_faulthandler(pids: dict[int, int], deadline: float) -> dict[int, str]:
    """rank -> what each process's faulthandler appended after STACK_SIGNAL (sent to all first, then read)."""
    texts, sent = {}, {}
    for rank, pid in pids.items():
        path = _fault_file(pid, rank)
        if STACK_SIGNAL is None or path is None or not _catches(pid, STACK_SIGNAL):
            texts[rank] = f"no stack: process {pid} has no stack handler installed (not started yet, or not a rank)\n"
            continue
        try:
            sent[rank] = (path, path.stat().st_size)
            os.kill(pid, STACK_SIGNAL)
        except OSError as err:  # it ended meanwhile, its file was removed, or it is another user's process
            texts[rank] = f"no stack: process {pid}: {err.strerror or err}\n"
            sent.pop(rank, None)
    for rank, (path, start) in sent.items():
        texts[rank] = _appended(path, start, deadline) or f"no stack: process {pids[rank]} wrote none in time\n"
    return texts


def _appended(path: Path, start: int, deadline: float) -> str:
    """What was written to `path` past `start`, once it stops growing (faulthandler writes a dump in a burst)."""
    last = start
    try:
        while time.monotonic() < deadline:
            time.sleep(0.1)
            size = path.stat().st_size
            if size > start and size == last:
                break
            last = size
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:  # the file was removed meanwhile: nothing to read
        return ""


def _fault_file(pid: int, rank: int) -> Optional[Path]:
    """The stack file process `pid` holds open (its faulthandler's), found among its descriptors."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone, or another user's
        return None
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:  # closed while we looked
            continue
        if link.endswith(f"/{STACKS}/rank{rank}.txt"):
            return Path(link)
    return None


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status): without one the signal
    would end it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (sig - 1) & 1)


# ----------------------------------------------------------------------------- on each node
def main(argv: Optional[list[str]] = None) -> int:
    """Dump this host's ranks of a run; print {"host": ..., "stacks": {rank: text}} as one JSON line."""
    parser = argparse.ArgumentParser(description="dump the Python stack of this host's ranks of a run")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    texts = dump(local_ranks(args.run_dir), args.dest, args.timeout)
    print(json.dumps({"host": socket.gethostname(), "stacks": {str(r): t for r, t in texts.items()}}), flush=True)
    return 0


def node_command(python: str, run_dir: Path, dest: Path, nodes: int, job_id: str) -> list[str]:
    """`main` once on each node of a running Slurm job, beside its ranks: `srun --overlap` runs a step in
    the job's allocation without waiting for its resources (the hung step holds them all)."""
    # --ntasks: from inside the job, srun would otherwise take the batch step's SLURM_NTASKS
    return ["srun", "--overlap", f"--jobid={job_id}", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            python, "-m", "jobs.stacks", "--run-dir", str(run_dir), "--dest", str(dest)]


def read_answers(output: str) -> dict[int, str]:
    """rank -> stack from the JSON lines `main` printed on each node (other lines, a node's warnings, skipped)."""
    texts: dict[int, str] = {}
    for line in output.splitlines():
        try:
            answer = json.loads(line) if line.startswith("{") else None
        except ValueError:
            continue
        found = answer.get("stacks") if isinstance(answer, dict) else None
        if isinstance(found, dict):
            texts.update({int(r): str(t) for r, t in found.items() if str(r).isdigit()})
    return dict(sorted(texts.items()))


if __name__ == "__main__":
    sys.exit(main())
