"""Upload rounds: every pending checkpoint sent oldest first, files first, each confirmed by its size
on the store, and its manifest last, so a half upload is never committed; then the remote pruned.

Failures are retried with capped exponential backoff (backoff.py); a store that is still down
leaves the upload pending for the next round (the next save, or flush()), and training never waits
for it. A round stops at the first checkpoint that fails: the store is probably down, and the rest
would wait out the same backoff.
"""
from __future__ import annotations

import time
from typing import Optional

from jobs.checkpoint.backoff import Backoff
from jobs.checkpoint.early import EarlyUploads
from jobs.checkpoint.errors import InvalidCheckpoint, log
from jobs.checkpoint.layout import MANIFEST, Manifest
from jobs.checkpoint.owner import FolderOwner
from jobs.checkpoint.published import Published
from jobs.checkpoint.remote_files import RemoteFiles
from jobs.checkpoint.retention import prune
from jobs.checkpoint.upload_state import UploadState
from jobs.schema import CheckpointConfig


class UploadRounds:
    """One round at a time, on the uploader thread or (synchronous saves) in the caller."""

    def __init__(self, cfg: CheckpointConfig, state: UploadState, files: RemoteFiles, owner: FolderOwner,
                 early: EarlyUploads, backoff: Backoff, published: Published) -> None:
        self.cfg, self.state, self.files, self.owner = cfg, state, files, owner
        self.early, self.backoff, self.published = early, backoff, published
        self.corrupt: set[str] = set()  # found corrupt at load: uploaded again even if the manifest matches

    def run(self, deadline: Optional[float]) -> bool:
        """Upload pending checkpoints oldest first, then prune the remote; True if all went up."""
        todo = [] if self.state.refused else sorted(self.state.pending())
        # Checked before every round: another run may have claimed the folder since the last one.
        if todo and self.backoff.run("owner check", lambda: self.owner.check(claim=True), deadline) is not None:
            return False
        for name in todo:
            if not self.state.begin_upload(name):
                continue  # dropped by retention meanwhile
            ok = False
            try:
                ok = self._upload(name, deadline)
            finally:
                self.state.end_upload(name, ok)
            if not ok:
                return False
        if todo:  # every pending checkpoint is up: nothing half-uploaded to protect
            self.backoff.run("pruning", lambda: prune(self.files.remote, self.cfg, lambda keep: set()), deadline)
        return True

    def _upload(self, name: str, deadline: Optional[float]) -> bool:
        """Files first, each confirmed by its size on the store; the manifest only after all."""
        spread = self.state.spread(name)  # its ranks sent their own files: only confirmed here
        try:
            manifest = spread or self.files.local.verify(name, full_hash=False)
        except (InvalidCheckpoint, FileNotFoundError) as err:
            log.warning("cannot upload %s: its local copy is gone or invalid (%s)", self.files.local.location(name),
                        err)
            self.early.forget(name)
            return True  # nothing left to upload; do not block the others
        started = time.perf_counter()
        there = self.files.manifest(name)
        if there is not None and there.files == manifest.files and name not in self.corrupt:
            return True  # uploaded before a restart
        if there is not None:  # another save of this step: uncommit it before replacing its files
            if not self.backoff.retry(f"removal of the old {name}/{MANIFEST}", lambda: self.files.uncommit(name),
                                      deadline):
                return False
        if not self._send_files(name, manifest, deadline, by_ranks=spread is not None):
            return False
        commit = lambda: self.files.put_text(name, MANIFEST, manifest.to_json())  # noqa: E731
        if not self.backoff.retry(f"upload of {name}/{MANIFEST}", commit, deadline):
            return False
        first_sent = self.early.forget(name)
        if first_sent is not None:  # its first file went up as it was written
            started = min(started, first_sent)
        self.corrupt.discard(name)
        self.published.uploaded(name, manifest, time.perf_counter() - started)
        return True

    def _send_files(self, name: str, manifest: Manifest, deadline: Optional[float], by_ranks: bool) -> bool:
        """Every file of the manifest on the store, skipping those sent early and still there. `by_ranks`:
        the files a rank wrote (their entries name it) were sent by that rank; their sizes are checked."""
        for file, entry in manifest.files.items():
            if self.early.already_sent(name, file, entry):
                continue
            if by_ranks and entry.rank is not None:
                send = lambda f=file, e=entry: self.files.confirm_size(name, f, e.size)  # noqa: E731
            else:
                send = lambda f=file, e=entry: self.files.put_confirmed(name, f, e.size)  # noqa: E731
            if not self.backoff.retry(f"upload of {name}/{file}", send, deadline):
                return False
        return True
