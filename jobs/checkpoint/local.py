"""The local writer: a step folder's files written and fsynced (hashed as they are written), then
committed by its manifest (an atomic rename), then the `latest` pointer.

Which files a process writes is a `StateWriter`'s job, committing is `commit_folder`'s: a sharded
save (several ranks writing parts of one checkpoint) is a new StateWriter whose entries name their
rank, gathered into one manifest that one process commits, last, as here.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from jobs.checkpoint.errors import describe, log
from jobs.checkpoint.disk import commit_folder, write_atomic
from jobs.checkpoint.layout import MANIFEST, POINTER, FileEntry, Manifest, step_dir_name
from jobs.checkpoint.store import Store
from jobs.checkpoint.stream import FileProgress
FileStarted = Callable[[str, FileProgress], None]  # a file is about to be written: watch it grow (the uploader)


class StateWriter(Protocol):
    """Writes this process's files of one checkpoint into its step folder and says what it wrote
    (size and SHA-256 per file). It does not commit: the manifest does, once every file is on disk.
    `on_file` hears of each file as it starts, with its progress (bytes on disk, then its entry)."""

    def write(self, folder: Path, state: dict[str, Any], on_file: Optional[FileStarted] = None) -> dict[str, FileEntry]:
        ...


class TorchFileWriter:
    """One torch.save file per top-level state key (`model.pt`, `optimizer.pt`, ...), all written
    by one process."""

    def write(self, folder: Path, state: dict[str, Any], on_file: Optional[FileStarted] = None) -> dict[str, FileEntry]:
        files = {}
        for key, obj in state.items():
            progress = FileProgress()
            if on_file is not None:
                on_file(f"{key}.pt", progress)
            files[f"{key}.pt"] = save_hashed(obj, folder / f"{key}.pt", progress)
        return files


class LocalWriter:
    """Commits checkpoints into the local folder. A write error (a full disk, a quota) costs that
    save, not the run: the partial folder is removed and the error logged."""

    def __init__(self, store: Store, run_id: Optional[str], files: Optional[StateWriter] = None) -> None:
        self.store, self.run_id = store, run_id
        self.folder = Path(store.root)
        self.files = files or TorchFileWriter()
        self._lock = threading.Lock()
        self.committed = self.failed = 0  # saves of this run

    def commit(self, step: int, state: dict[str, Any], metrics: dict[str, float],
               shards: Optional[dict[str, FileEntry]] = None,
               on_file: Optional[FileStarted] = None, here: bool = True) -> Optional[Manifest]:
        """Write the files, then the manifest (the commit), then the pointer. None if already there
        or if the disk refused the write. `shards`: the files the ranks of a sharded save already
        wrote into the folder (jobs.checkpoint.sharded), which the manifest covers too. `on_file`:
        told of each file as it starts, with its progress (the uploader sends it as it grows).
        `here=False`: the files are written and the manifest returned, but nothing is committed in this
        folder (a sharded save whose other shards are on other nodes: committed remotely only)."""
        folder = self.folder / step_dir_name(step)
        if shards is None and self.store.is_intact(folder.name):
            log.warning("%s is already committed (by an earlier run?); keeping it, not saving step %d again",
                        folder, step)
            self.count(committed=True)
            return None
        try:
            manifest = self._write_folder(folder, step, state, metrics, shards, on_file, here)
        except OSError as err:
            self._discard_failed_save(folder, step, err)
            return None
        self.count(committed=True)
        if not here:
            return manifest
        try:
            write_atomic(self.folder / POINTER, folder.name + "\n")
        except OSError as err:  # the checkpoint is committed: the pointer is only a hint for humans
            log.warning("could not update %s (%s)", self.folder / POINTER, describe(err))
        return manifest

    @property
    def nothing_saved(self) -> bool:
        """Every save of this run failed to write (and there was at least one)."""
        with self._lock:
            return self.failed > 0 and self.committed == 0

    def _write_folder(self, folder: Path, step: int, state: dict[str, Any], metrics: dict[str, float],
                      shards: Optional[dict[str, FileEntry]], on_file: Optional[FileStarted], here: bool) -> Manifest:
        if shards is None:
            if folder.exists():
                (folder / MANIFEST).unlink(missing_ok=True)  # uncommit first: a crash below leaves no half-valid folder
                shutil.rmtree(folder)  # an interrupted or corrupt save of this step
            folder.mkdir(parents=True)
        files = self.files.write(folder, state, on_file)
        clash = files.keys() & (shards or {}).keys()
        if clash:
            raise ValueError(f"checkpoint state keys {sorted(clash)} clash with the shards' files")
        manifest = Manifest(step, metrics, time.time(), {**files, **(shards or {})}, self.run_id)
        if here:
            commit_folder(folder, manifest)
        return manifest

    def _discard_failed_save(self, folder: Path, step: int, err: OSError) -> None:
        """The partial folder goes, training continues, and the next save tries again."""
        shutil.rmtree(folder, ignore_errors=True)
        self.count(committed=False)
        log.error("checkpoint step %d NOT saved: writing %s failed (%s). Removed the partial folder; training "
                  "continues and the next save tries again. Free space in %s", step, folder, describe(err),
                  self.folder)

    def count(self, committed: bool) -> None:
        with self._lock:
            if committed:
                self.committed += 1
            else:
                self.failed += 1


class HashingWriter:
    """The file object torch.save writes through: hashes what it writes (no second read) and
    writes with the GIL released. torch.save(obj, path) writes each tensor holding the GIL, which
    stalls the training thread for ~0.1 s per 100 MB; here it gets memoryviews and hands them to
    hashlib and an unbuffered file, both of which release the GIL."""

    def __init__(self, f: io.RawIOBase, progress: Optional[FileProgress] = None) -> None:
        self.f, self.digest, self.size, self.progress = f, hashlib.sha256(), 0, progress
        self.error: Optional[OSError] = None  # torch.save turns it into a RuntimeError without the errno

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += self.f.write(view[written:]) or 0
        except OSError as err:
            self.error = self.error or err
            raise
        self.size += written
        if self.progress is not None:
            self.progress.advance(written)  # these bytes are in the file: the uploader may read them
        return written

    def flush(self) -> None:
        pass  # unbuffered: nothing held back


def save_hashed(obj: Any, path: Path, progress: Optional[FileProgress] = None) -> FileEntry:
    """torch.save `obj` into `path`, fsynced; its size and SHA-256. `progress` follows the write (and hears
    of its end before the fsync: a streamed upload needs the bytes, not their durability)."""
    try:
        with open(path, "wb", buffering=0) as f:
            writer = HashingWriter(f, progress)  # type: ignore[arg-type]
            try:
                torch.save(obj, writer)  # type: ignore[arg-type]
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            entry = FileEntry(writer.size, writer.digest.hexdigest())
            if progress is not None:
                progress.finish(entry)
            os.fsync(f.fileno())
    except BaseException:
        if progress is not None:
            progress.fail()
        raise
    return entry
