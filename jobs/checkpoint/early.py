"""Early uploads: each file of a save starts up while the local writer is still writing it (streamed
part by part to S3, jobs/checkpoint/stream.py; sent whole once written to other stores), so a save's
upload overlaps its local write, which counts when a spot notice leaves seconds to get the
checkpoint off the VM. Nothing is committed early: the round after the local commit confirms what
went up, sends the rest and writes the manifest last.

Touched by the uploader thread only (early sends and rounds both run there), so nothing here is locked.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

from jobs.checkpoint.errors import FILE_ONLY, ForeignRunFolder, describe, log
from jobs.checkpoint.layout import FileEntry
from jobs.checkpoint.remote_files import RemoteFiles
from jobs.checkpoint.stream import FileProgress, stream_to_s3
from jobs.storage import s3_client


class EarlyUploads:
    """What went up early, per checkpoint folder, for the round that commits it."""

    def __init__(self, files: RemoteFiles, check_owner: Callable[[bool], None], stop: threading.Event) -> None:
        self.files, self.check_owner, self.stop = files, check_owner, stop
        self._allowed: dict[str, bool] = {}  # folder -> whether its files may go up before its commit
        self._sent: dict[str, dict[str, FileEntry]] = {}  # folder -> files already on the store
        self._first_sent: dict[str, float] = {}  # folder -> perf_counter() when its first file started up

    def send(self, name: str, file: str, progress: FileProgress) -> None:
        """One try, no backoff: a file that does not go up now is sent by the round, with retries.
        Raises ForeignRunFolder (the folder is another run's); other failures are only logged."""
        try:
            if name not in self._allowed:
                self.check_owner(True)
                # a committed copy of this step is there (a save of it before a restart): its files may not
                # change under its manifest, so the round uncommits it first and sends everything
                self._allowed[name] = self.files.manifest(name) is None
            if not self._allowed[name]:
                return
            self._first_sent.setdefault(name, time.perf_counter())
            entry = self._send_growing(name, file, progress)
            if entry is not None:
                self._sent.setdefault(name, {})[file] = entry
        except ForeignRunFolder:
            raise
        except Exception as err:
            log.info("upload of %s/%s as it was written failed (%s); the upload round sends it", name, file,
                     describe(err), extra=FILE_ONLY)

    def _send_growing(self, name: str, file: str, progress: FileProgress) -> Optional[FileEntry]:
        """The file on the store once the writer is done with it, its size confirmed; None if the writer
        failed or the uploader is stopping."""
        files = self.files
        client, target = s3_client(files.remote.fs), files.remote.path(name, file)
        if client is not None:
            bucket, key = target.split("/", 1)
            entry = stream_to_s3(client, bucket, key, Path(files.local.path(name, file)), progress, self.stop)
        else:
            progress.wait_end(self.stop)  # other stores get the whole file
            entry = progress.entry
            if entry is not None and not self.stop.is_set():
                files.put_confirmed(name, file, entry.size)
                return entry
        if entry is not None:
            files.confirm_size(name, file, entry.size)
        return entry

    def already_sent(self, name: str, file: str, entry: FileEntry) -> bool:
        """Sent early with these bytes, and still there at that size (one HEAD request)."""
        if self._sent.get(name, {}).get(file) != entry:
            return False
        try:
            return self.files.size_on_store(name, file) == entry.size
        except Exception:
            return False

    def forget(self, name: str) -> Optional[float]:
        """Drop what was noted of checkpoint `name` (it is up, or will never be); when its first file
        started up, if one did."""
        self._sent.pop(name, None)
        self._allowed.pop(name, None)
        return self._first_sent.pop(name, None)
