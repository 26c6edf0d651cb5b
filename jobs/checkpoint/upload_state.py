"""What the training thread and the uploader thread share, in one object under one condition variable.

The training side (saves, flush(), retention) adds pending checkpoints, asks for rounds and waits
for them, and queues files to stream as they are written; the uploader thread takes that work,
marks which checkpoint it is uploading and reports rounds done. Every field both threads touch is
here and read or written only under `cond`; nothing else in the uploader is shared (what the
parts keep of early uploads and corrupt copies is touched by the uploader thread alone, or by the
caller when there is no thread).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Iterable, Optional

from jobs.checkpoint.errors import FILE_ONLY, ForeignRunFolder, log
from jobs.checkpoint.layout import Manifest
from jobs.checkpoint.stream import FileProgress

EarlyFile = tuple[str, str, FileProgress]  # (checkpoint folder, file, the writer's progress on it)


class UploadState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.stop = threading.Event()  # stop(): the thread ends, backoff waits are cut short
        self.deadline: Optional[float] = None  # of the flush() in progress: backoff stops there
        self._pending: set[str] = set()  # committed locally, not yet on the remote store
        self._spread: dict[str, Manifest] = {}  # pending saves committed nowhere yet: their ranks' files are up (spread.py)
        self._uploading: Optional[str] = None
        self._rounds_requested = self._rounds_done = 0
        self._early: deque[EarlyFile] = deque()  # files being written locally, to send as they grow
        self.refused = False  # the folder is another run's: nothing more is sent (the error is raised once)
        self._error: Optional[BaseException] = None

    # ------------------------------------------------------------------ pending checkpoints
    def pending(self) -> set[str]:
        with self.cond:
            return set(self._pending)

    def add_pending(self, names: Iterable[str]) -> None:
        with self.cond:
            self._pending.update(names)

    def add_spread(self, name: str, manifest: Manifest) -> None:
        """A sharded save whose ranks sent their own files (spread.py): its manifest is committed by the
        next round, which sends only the writer's files; there is no local commit to read it from."""
        with self.cond:
            self._spread[name] = manifest
            self._pending.add(name)

    def spread(self, name: str) -> Optional[Manifest]:
        with self.cond:
            return self._spread.get(name)

    def begin_upload(self, name: str) -> bool:
        """Mark `name` as being uploaded, which retention must not drop (drop_replaced); False if it is
        no longer pending (dropped by retention meanwhile). end_upload() when done, either way."""
        with self.cond:
            if name not in self._pending:
                return False
            self._uploading = name
            return True

    def end_upload(self, name: str, uploaded: bool) -> None:
        with self.cond:
            self._uploading = None
            if uploaded:
                self._pending.discard(name)
                self._spread.pop(name, None)

    def drop_replaced(self, keep: set[str]) -> set[str]:
        """Pending uploads outside `keep` are dropped, except the one being uploaded; returns that one."""
        with self.cond:
            dropped = self._pending - keep - {self._uploading}
            if dropped:
                log.info("not uploading %s any more: newer checkpoints replace them", sorted(dropped),
                         extra=FILE_ONLY)
            self._pending -= dropped
            for name in dropped:
                self._spread.pop(name, None)
            return {self._uploading} if self._uploading else set()

    # ------------------------------------------------------------------ work for the thread
    def request_round(self) -> int:
        """A ticket: the round is done once rounds_done reaches it."""
        with self.cond:
            self._rounds_requested += 1
            self.cond.notify_all()
            return self._rounds_requested

    def wait_round(self, ticket: int, deadline: Optional[float]) -> bool:
        """Until round `ticket` is done or `deadline` passes; True if nothing is pending then."""
        with self.cond:
            self.cond.wait_for(lambda: self._rounds_done >= ticket,
                               timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not self._pending

    def round_done(self, ticket: int) -> None:
        with self.cond:
            self._rounds_done = ticket
            self.cond.notify_all()

    def push_early(self, early: EarlyFile) -> None:
        with self.cond:
            self._early.append(early)
            self.cond.notify_all()

    def next_work(self) -> Optional[tuple[Optional[EarlyFile], int, Optional[float]]]:
        """For the thread: (a file to stream or None, the round ticket, the flush deadline) once there
        is work; None once stopped. Files come before rounds: the round after a save's commit needs them."""
        with self.cond:
            self.cond.wait_for(lambda: self.stop.is_set() or bool(self._early)
                               or self._rounds_requested > self._rounds_done)
            if self.stop.is_set():
                return None
            early = self._early.popleft() if self._early else None
            return early, self._rounds_requested, self.deadline

    def request_stop(self) -> None:
        with self.cond:
            self.stop.set()
            self.cond.notify_all()

    # ------------------------------------------------------------------ another run's folder
    def refuse(self, err: ForeignRunFolder) -> None:
        if not self.refused:
            log.error("%s", err)
            self.refused, self._error = True, err

    def take_error(self) -> Optional[BaseException]:
        """An error of the background thread the training loop must see (another run's folder)."""
        error, self._error = self._error, None
        return error
