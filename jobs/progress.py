"""Each rank's progress report, for the watchdog of whatever supervises the ranks (`jobs.watchdog`).

A rank keeps one small file, `<run>/progress/rankN` (`Run.progress_file`), and overwrites it in place with
one fixed-width JSON line: its pid (the process whose stack is dumped on a hang), how many steps it reported
(`beats`), its step and the slowest gap between two reports it measured itself. One `pwrite` per step, no
new inode, no lock: the watchdog only compares what it reads with what it read before, on its own clock, so
neither a torn read (counted as a change, once) nor clocks of other machines can make a hang.

Writers: the trainer at every step (`StepReporter`, registered for every rank in `jobs.train`), the runtime
API at every `should_stop()` (a script's step), and the script wrapper once with the script's pid (a plain
script reports no steps: the watchdog watches its CPU time and its log instead). torch-free."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

WIDTH = 256  # bytes of the line: every write covers the whole previous one


@dataclass(frozen=True)
class Report:
    """What a rank last said: the watchdog's view of one progress file."""

    pid: int
    beats: int = 0  # steps reported since this process started (0: none yet)
    step: Optional[int] = None
    slowest_s: float = 0.0  # the longest gap between two step reports on this rank
    host: str = ""  # where `pid` runs: a supervisor on another node cannot look the pid up

    @classmethod
    def read(cls, path: Path) -> Optional["Report"]:
        """The report in `path`, None while there is none or it cannot be parsed (a torn read)."""
        try:
            data = json.loads(path.read_bytes()[:WIDTH * 2] or b"null")
            return cls(int(data["pid"]), int(data["beats"]), data.get("step"), float(data["slowest_s"]),
                       str(data.get("host", "")))
        except (OSError, ValueError, TypeError, KeyError):
            return None


class ProgressWriter:
    """Overwrites one rank's progress file; `pid` is the process that does the rank's work."""

    def __init__(self, path: Path, pid: Optional[int] = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # no O_TRUNC: a reader never sees it empty
        self.pid = pid or os.getpid()
        self.beats, self.step, self.slowest_s = 0, None, 0.0
        self._last: Optional[float] = None

    def started(self) -> "ProgressWriter":
        """A report with no step yet: the pid is known from the start."""
        self._write()
        return self

    def beat(self, step: Optional[int] = None) -> None:
        """One step done: counted, and the gap since the previous one measured."""
        now = time.monotonic()
        if self._last is not None:
            self.slowest_s = max(self.slowest_s, now - self._last)
        self._last = now
        self.beats += 1
        self.step = step if step is not None else self.beats
        self._write()

    def _write(self) -> None:
        line: dict[str, Any] = {"pid": self.pid, "beats": self.beats, "step": self.step,
                                "slowest_s": round(self.slowest_s, 3), "time": round(time.time(), 3),
                                "host": socket.gethostname()[:64]}
        os.pwrite(self._fd, json.dumps(line).ljust(WIDTH - 1).encode() + b"\n", 0)


class StepReporter:
    """The trainer's callback: a beat after every optimizer step."""

    def __init__(self, path: Path) -> None:
        self.writer = ProgressWriter(path).started()

    def on_step_end(self, progress: Any) -> None:
        self.writer.beat(progress.step)
