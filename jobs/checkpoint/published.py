"""After a checkpoint is committed remotely: the log line, the saves log's upload record and the
remote `latest` pointer (jobs.checkpoint.layout.POINTER), which never moves backwards."""
from __future__ import annotations

import time

from jobs.checkpoint.backoff import Backoff
from jobs.checkpoint.disk import SavesLog
from jobs.checkpoint.errors import FILE_ONLY, log
from jobs.checkpoint.layout import POINTER, Manifest
from jobs.checkpoint.remote_files import RemoteFiles


class Published:
    """Records each remote commit; the pointer names the newest step uploaded by this run."""

    def __init__(self, files: RemoteFiles, saves_log: SavesLog, backoff: Backoff) -> None:
        self.files, self.saves_log, self.backoff = files, saves_log, backoff
        self._pointer_step = -1

    def uploaded(self, name: str, manifest: Manifest, upload_s: float) -> None:
        log.info("checkpoint step %d committed to %s in %.3f s (%.1f MB)", manifest.step,
                 self.files.remote.location(name), upload_s, manifest.total_bytes / 1e6, extra=FILE_ONLY)
        self.saves_log.append({"event": "upload", "step": manifest.step, "upload_s": round(upload_s, 4),
                               "bytes": manifest.total_bytes, "time": time.time()})
        if manifest.step > self._pointer_step:  # a pointer is only a hint, but never move it backwards
            self._pointer_step = manifest.step
            self.backoff.run("pointer update", lambda: self.files.put_text("", POINTER, name + "\n"), None)
