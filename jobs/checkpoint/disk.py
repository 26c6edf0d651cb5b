"""Durable local files: fsync, atomic writes and the commit of a step folder by its manifest, and
the saves log. Torch-free: the local writer commits with it, and so does a download (store.py),
without either importing the other."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from jobs.checkpoint.errors import describe, log
from jobs.checkpoint.layout import MANIFEST, Manifest


def commit_folder(folder: Path, manifest: Manifest) -> None:
    """The commit: every file's directory entry made durable, then the manifest, atomically."""
    fsync_path(folder)
    write_atomic(folder / MANIFEST, manifest.to_json())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)  # the rename itself must survive a power cut


class SavesLog:
    """`saves.jsonl`: one JSON line per save and per upload (timings, bytes), from either thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        try:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # timings only: a full disk must not cost the checkpoint itself
            log.warning("could not append to %s (%s)", self.path, describe(err))
