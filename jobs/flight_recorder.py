"""torch's flight recorder: each rank keeps its last collectives (NCCL and, in torch 2.13, gloo too), and on a
hang each rank writes its record next to its stack, so the dump says which collective each rank entered last
and which one it never finished (rank 0 waits in all_reduce #7, rank 1 left #6 and never came).

The record is kept from the process group's start (`environment()`, read by torch when a group is made; the
trainer sets it in `jobs.stacks.install`, a script's wrapper in the script's environment). A collective that
times out dumps it too (TORCH_NCCL_DUMP_ON_TIMEOUT, NCCL). Our watchdog kills a hung attempt long before the
collective timeout, so it asks for the record first: a rank that trains with the built-in trainer runs a small
daemon thread (`serve`) that waits for a request (`<run>/logs/stacks/.flight-recorder`, the folder to dump
into) and writes `flight-rank<N>.json` there. A rank stuck in a collective or a sleep has released the GIL,
so the thread runs. The supervisor asks (`request`) before it dumps the stacks and waits for the answers
(`collect`, bounded) before it kills anything. A user's script makes its own process group: its record is
kept, but only a collective timeout dumps it."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from jobs.schema.run_dir import LOGS, STACKS
from jobs.schema.run_files import replace_text

ENTRIES = 2000  # collectives kept per process group (TorchTitan keeps 20000; each is a few hundred bytes)
REQUEST = ".flight-recorder"  # in <run>/logs/stacks/: the folder a dump goes to, written by the supervisor
POLL_S = 0.5
WAIT_S = 10.0  # how long a supervisor waits for the records before it kills the ranks anyway


def environment(run_dir: Path) -> dict[str, str]:
    """The recorder on for every rank, and NCCL's own dump on a collective timeout into the run's stacks folder
    (`nccl-trace-rank<N>`). Read when a process group is made; a user's own setting wins (callers keep it)."""
    size = str(ENTRIES)
    return {"TORCH_FR_BUFFER_SIZE": size, "TORCH_NCCL_TRACE_BUFFER_SIZE": size, "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(run_dir / LOGS / STACKS / "nccl-trace-rank")}


def record_file(dest: Path, rank: int) -> Path:
    return dest / f"flight-rank{rank}.json"


def _folder(run_dir: Path) -> Path:
    return run_dir / LOGS / STACKS


def _marker(run_dir: Path, rank: int) -> Path:
    return _folder(run_dir) / f".flight-recorder-rank{rank}"


def serve(run_dir: Path, rank: int, dump: Optional[Callable[[], bytes]] = None) -> Optional[threading.Thread]:
    """In a rank with a process group: answer the supervisor's requests from a daemon thread. None where this
    torch has no flight recorder."""
    dump = dump or _torch_dump()
    if dump is None:
        return None
    _folder(run_dir).mkdir(parents=True, exist_ok=True)
    request = _folder(run_dir) / REQUEST
    seen = _stamp(request)  # a request older than this process is not for it
    _marker(run_dir, rank).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    thread = threading.Thread(target=_answer, args=(request, rank, dump, seen), name="flight-recorder", daemon=True)
    thread.start()
    return thread


def _answer(request: Path, rank: int, dump: Callable[[], bytes], seen: Optional[int]) -> None:
    while True:
        time.sleep(POLL_S)
        stamp = _stamp(request)
        if stamp is None or stamp == seen:
            continue
        seen = stamp
        try:
            dest = Path(request.read_text().strip())
            _write(record_file(dest, rank), _readable(pickle.loads(dump())))
        except Exception:  # noqa: BLE001 - a failed dump must never end the rank; the stacks still say where it is
            continue


def _torch_dump() -> Optional[Callable[[], bytes]]:
    try:
        from torch._C._distributed_c10d import _dump_fr_trace
    except ImportError:
        return None
    return lambda: _dump_fr_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False)


def _readable(trace: Any) -> dict:
    """The record as JSON: every entry's group, sequence number, operation, sizes and state."""
    return json.loads(json.dumps(trace, default=str))


def _write(path: Path, data: dict) -> None:
    replace_text(path, json.dumps(data, indent=1) + "\n")


def _stamp(path: Path) -> Optional[int]:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def request(run_dir: Path, dest: Path) -> list[int]:
    """Ask every serving rank of this run folder for its record in `dest`; the ranks asked (their marker is
    there, and on this host their process lives)."""
    ranks = [int(p.name.rpartition("rank")[2]) for p in _folder(run_dir).glob(".flight-recorder-rank*")
             if p.name.rpartition("rank")[2].isdigit() and _serving(p)]
    if ranks:
        dest.mkdir(parents=True, exist_ok=True)
        replace_text(_folder(run_dir) / REQUEST, f"{dest}\n")
    return sorted(ranks)


def _serving(marker: Path) -> bool:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("host") != socket.gethostname():
        return True  # another node's rank (a shared run folder): it answers for itself
    return Path(f"/proc/{data.get('pid')}").exists()


def collect(dest: Path, ranks: list[int], timeout_s: float = WAIT_S) -> list[int]:
    """Wait (at most `timeout_s`) until every asked rank's record is in `dest`; the ranks that answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(record_file(dest, r).exists() for r in ranks):
        time.sleep(0.1)
    return [r for r in ranks if record_file(dest, r).exists()]


@contextlib.contextmanager
def recording(run_dir: Path, dest: Path) -> Iterator[None]:
    """Around a hang's stack dump: the serving ranks are asked first (their threads answer while the stacks
    are read), and their records are waited for before the block's caller kills anything."""
    asked = request(run_dir, dest)
    yield
    if asked:
        collect(dest, asked)


def last_collective(record: dict) -> Optional[tuple[int, str, str]]:
    """(sequence number, operation, state) of the newest entry of the default group, None without one."""
    entries = [e for e in record.get("entries", []) if str(e.get("pg_id")) == "0" and not e.get("is_p2p")]
    if not entries:
        return None
    last = max(entries, key=lambda e: int(e.get("collective_seq_id", 0)))
    return int(last.get("collective_seq_id", 0)), str(last.get("profiling_name", "?")), str(last.get("state", "?"))
