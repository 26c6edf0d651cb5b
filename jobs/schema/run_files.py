"""Bounded, hang-free reads of the files in a run directory (run.json, result.json, metrics.jsonl, logs).

A run directory is written by processes that may crash mid-write and may be edited or damaged by hand, so
every reader goes through these: only regular files are opened (a FIFO would block the reader for ever, a
symlink to /dev/zero would never end), each read is capped, and JSON that is nested too deeply for the
parser or for the code that walks it afterwards is refused like any other invalid JSON. Each failure is
an OSError or a ValueError whose message says what the file is, so a caller's existing handlers say it.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

MAX_RECORD = 4 << 20  # run.json, result.json: a few KiB when written by the launcher
MAX_DEPTH = 64  # containers inside containers: far beyond any record the launcher writes
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The path (after symlinks) is a folder, a FIFO, a device or a socket: it is never read."""


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file (symlinks followed); else NotRegularFile.
    O_NONBLOCK: a FIFO put there between the check and the open is opened without waiting for a writer,
    and then refused by the second check."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise NotRegularFile(f"not a regular file ({kind_of(mode)})")


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a reader (status, the doctor, a supervisor's poll) never sees half a
    file. The temporary file is named by this process, so two writers never share one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_capped(path: Path, limit: int) -> bytes:
    """The whole file, refused (ValueError) if it is over `limit` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over {limit >> 20} MiB: not a file the launcher wrote")
    return data


def parse_json(text: str | bytes) -> Any:
    """json.loads that raises ValueError (never RecursionError) for JSON nested over MAX_DEPTH deep."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested over {MAX_DEPTH} deep") from None
    if _depth_over(data, MAX_DEPTH):
        raise ValueError(f"JSON nested over {MAX_DEPTH} deep")
    return data


def _depth_over(data: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep, walked without recursion (the depth is the question)."""
    todo = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return False


def load_record(path: Path, limit: int = MAX_RECORD) -> Any:
    """The JSON value in the regular file `path`: OSError if it cannot be read, ValueError if not usable JSON."""
    return parse_json(read_capped(path, limit))
