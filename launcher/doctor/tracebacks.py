"""Python tracebacks in a run's logs, whatever prefixes their lines carry.

A script's traceback reaches a log with prefixes in front of every line: torch's own `[rank1]: ` (added
to an uncaught exception's lines once the process group exists), our console tee's `[rank1] ` before
that (`[rank1] [rank1]:   File ...` on the console and in a Slurm job's output), torchrun's `[default0]:`,
srun's `0: `, the timestamps and level names a `tee`, `ts` or a logging handler adds. The prefixes are
peeled off; a `[rankN]` among them says whose line it is, so the ranks' lines interleaved in one file are
followed apart. Indentation is read relative to the `Traceback` line, which carries the same prefixes.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from launcher.doctor.findings import Line
from launcher.doctor.records import RunRecords

# One prefix at the start of a line; `split_prefixes` peels them off one by one.
PREFIX = re.compile(
    r"\[(?:rank|default)(?P<rank>\d+)\]:? ?"  # our tee's "[rank1] ", torch's "[rank1]: ", torchrun's "[default0]:"
    r"|\d{1,5}: (?=\S|  )"  # srun --label: "0: "
    r"|\[?\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\]?:? ?"  # 2026-12-07 07:05:58,268
    r"|\[?\d\d:\d\d:\d\d(?:[.,]\d+)?\]? "  # 07:05:58 (jobs.train, many loggers)
    r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d "  # ts, syslog: "Dec  7 07:05:58 "
    r"|\[?[IWEF]\d{3,4} \d\d:\d\d:\d\d\.\d+(?: +\d+)? [^\]]*\] ?"  # glog, torch's C++: "E1207 07:05:58.2 api.py:10] "
    r"|\[?(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b\]?(?::| -| \|)? ?"  # a level name
    r"|[-|] ")  # the separator a log format puts between fields
FRAME = re.compile(r'^File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<function>.+))?$')
START = "Traceback (most recent call last):"
# The last line of a traceback: the exception's qualified class name, then its message.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?::.*)?$")
# torchrun's and the launcher's own report that a rank failed: a consequence, never the cause.
CONSEQUENCE = re.compile(r"\b(?:ChildFailedError|SignalException|ScriptFailed)\b")


def split_prefixes(text: str) -> tuple[Optional[int], str]:
    """The rank a line's prefixes name (None if none does) and the line without them."""
    rank, rest = None, text
    for _ in range(8):  # a line carries a few prefixes at most
        m = PREFIX.match(rest)
        if not m or not m.end():
            break
        if m.group("rank") is not None and rank is None:
            rank = int(m.group("rank"))
        rest = rest[m.end():]
    return rank, rest


def content(line: Line) -> str:
    """What a line says without its prefixes and indentation."""
    return split_prefixes(line.text)[1].strip()


@dataclass(frozen=True)
class Frame:
    file: str  # as the traceback names it
    number: int
    function: str
    logged: Line  # the log line that names it

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass(frozen=True)
class Traceback:
    """One traceback as a log holds it: the rank whose it is (None where nothing says), its frames
    (outermost first) and its exception line."""

    rank: Optional[int]
    frames: tuple[Frame, ...]
    exception: Line  # the log line
    said: str  # the exception line without prefixes: "AttributeError: module 'torch._C' has no ..."

    @property
    def kind(self) -> str:
        """The exception's class name without its module: AttributeError, OutOfMemoryError."""
        return self.said.split(":", 1)[0].rsplit(".", 1)[-1]


class _Reader:
    """Follows one stream of lines (one rank's in one file) through its tracebacks."""

    def __init__(self, rank: Optional[int]) -> None:
        self.rank = rank
        self.base: Optional[int] = None  # the indentation of the open traceback's first line
        self.frames: list[Frame] = []

    def feed(self, line: Line, body: str) -> Optional[Traceback]:
        text = body.strip()
        indent = len(body) - len(body.lstrip())
        if text.endswith(START):  # a new one (a chained exception's next traceback, too)
            self.base, self.frames = indent, []
            return None
        if self.base is None:
            return None
        if indent > self.base or text.startswith("^") or text.startswith("[Previous line repeated"):
            m = FRAME.match(text)
            if m:
                self.frames.append(Frame(m.group("file"), int(m.group("line")), m.group("function") or "", line))
            return None  # a frame, its source line, the carets under it
        self.base = None
        if EXCEPTION_LINE.match(text) and self.frames:
            return Traceback(self.rank, tuple(self.frames), line, text)
        return None


def tracebacks(records: RunRecords) -> list[Traceback]:
    """Every traceback of the last launch, in the order of its files (the ranks' logs first)."""
    found: list[Traceback] = []
    for lines in _files(records):
        readers: dict[Optional[int], _Reader] = {}
        for line in lines:
            named, body = split_prefixes(line.text)
            rank = named if named is not None else _rank_of_file(line.path)
            reader = readers.setdefault(rank, _Reader(rank))
            done = reader.feed(line, body)
            if done is not None:
                found.append(done)
    return found


def _files(records: RunRecords) -> Iterator[Sequence[Line]]:
    for log in records.ranks:
        yield log.lines
    by_path: dict[str, list[Line]] = {}
    for line in records.job_output:
        by_path.setdefault(line.path, []).append(line)
    yield from by_path.values()


@functools.lru_cache(maxsize=256)  # called for every line, with a few file names
def _rank_of_file(path: str) -> Optional[int]:
    m = re.search(r"rank(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def last_by_rank(records: RunRecords) -> list[Traceback]:
    """Each rank's last traceback (a chained exception's last one is what ended it), a rank's own log
    before other files; torchrun's report that a child failed is left out. Tracebacks no rank is named
    for count only when no rank's is known."""
    ranked: dict[int, Traceback] = {}
    unnamed: list[Traceback] = []
    every = tracebacks(records)
    from_logs = {tb.rank for tb in every if tb.exception.path.startswith("logs/")}
    for tb in every:
        if CONSEQUENCE.search(tb.said):
            continue
        if tb.rank is None:
            unnamed.append(tb)
        elif tb.rank not in from_logs or tb.exception.path.startswith("logs/"):
            ranked[tb.rank] = tb
    return [ranked[r] for r in sorted(ranked)] or unnamed[-1:]


# Where a library lives: a frame there is not the user's line.
LIBRARY = re.compile(r"[/\\](?:site|dist)-packages[/\\]|[/\\]lib[/\\]python\d[\d.]*[/\\]|^<")
ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = {"launcher": ROOT / "launcher", "jobs": ROOT / "jobs"}  # this installation's own code


def user_frame(tb: Traceback, code_dir: Optional[str]) -> Frame:
    """The innermost frame in the user's code (not a library's, not the launcher's own), else the innermost."""
    for frame in reversed(tb.frames):
        if users(frame.file, code_dir):
            return frame
    return tb.frames[-1]


def users(file: str, code_dir: Optional[str]) -> bool:
    """Whether a frame's file is the user's: a library's is not, even in a virtualenv inside the project."""
    if LIBRARY.search(file) or any(_under(file, str(own)) for own in OWN_PACKAGES.values()):
        return False
    if code_dir and _under(file, code_dir):
        return True
    # recorded on another machine: the launcher's own module at another path (".../jobs/training/step.py")
    m = re.search(r"[/\\](launcher|jobs)[/\\](.+\.py)$", file)
    return not (m and (OWN_PACKAGES[m.group(1)] / m.group(2)).is_file())


def _under(file: str, folder: str) -> bool:
    return file.startswith(folder.rstrip("/") + "/")


def shown(frame: Frame, code_dir: Optional[str]) -> str:
    """file:line of a frame, relative to the code folder where it lies there."""
    if code_dir and _under(frame.file, code_dir):
        return f"{frame.file[len(code_dir.rstrip('/')) + 1:]}:{frame.number}"
    return frame.where
