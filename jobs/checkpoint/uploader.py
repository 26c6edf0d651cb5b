"""The uploader: sends committed local checkpoints to the remote store and owns that folder.

A thin coordinator of the parts, one job each:

    upload_state.py  what the training thread and the uploader thread share (one condition variable)
    owner.py         the owner claim: the remote folder is this run's, checked before every round
    early.py         early streaming: each file starts up while the local writer is still writing it
    rounds.py        retried upload rounds: files first, manifest last, then the remote pruned
    published.py     after each remote commit: the pointer and the saves log
    remote_files.py  the single requests the others make of the store
    backoff.py       capped exponential backoff, cut short by a deadline or stop()

Rounds run on a background thread once start()ed (async saves; training never waits for the store),
else inline in the caller (synchronous saves).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Collection, Iterable, Optional

from jobs.checkpoint.backoff import BACKOFF_FIRST_S, Backoff
from jobs.checkpoint.disk import SavesLog
from jobs.checkpoint.early import EarlyUploads
from jobs.checkpoint.errors import FILE_ONLY, ForeignRunFolder, describe, log
from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest
from jobs.checkpoint.owner import FolderOwner
from jobs.checkpoint.published import Published
from jobs.checkpoint.remote_files import RemoteFiles
from jobs.checkpoint.rounds import UploadRounds
from jobs.checkpoint.store import Store
from jobs.checkpoint.stream import FileProgress, stream_to_s3
from jobs.checkpoint.upload_state import UploadState
from jobs.schema import CheckpointConfig
from jobs.storage import s3_client


class Uploader:
    """Upload rounds, on a background thread once start()ed, else inline in the caller."""

    def __init__(self, cfg: CheckpointConfig, local: Store, remote: Store, run_id: Optional[str],
                 saves_log: SavesLog) -> None:
        self.cfg, self.local, self.remote, self.run_id = cfg, local, remote, run_id
        self._state = UploadState()
        files = self._files = RemoteFiles(local, remote)
        backoff = Backoff(cfg.upload_retries, remote.uri, self._state.stop)
        self._owner = FolderOwner(files, run_id)
        self._early = EarlyUploads(files, self._owner.check, self._state.stop)
        self._rounds = UploadRounds(cfg, self._state, files, self._owner, self._early, backoff,
                                    Published(files, saves_log, backoff))
        self._backoff = backoff
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ckpt-uploader", daemon=True)
        self._thread.start()
        if self.pending:
            self.request_round()

    def stop(self) -> None:
        """Stop the thread, cutting a backoff wait short; an upload in progress is left pending."""
        if self._thread is None:
            return  # synchronous saves: rounds run in the caller, nothing to stop
        self._state.request_stop()
        self._thread.join(timeout=10)
        self._thread = None

    def take_error(self) -> Optional[BaseException]:
        """An error of the background thread the training loop must see (another run's folder)."""
        return self._state.take_error()

    # ------------------------------------------------------------------ what is pending
    @property
    def pending(self) -> set[str]:
        return self._state.pending()

    def add_pending(self, names: Iterable[str]) -> None:
        self._state.add_pending(names)

    def mark_corrupt(self, name: str) -> None:
        """The remote copy of `name` failed its hashes: upload it again even if its manifest matches."""
        self._rounds.corrupt.add(name)

    def drop_replaced(self, keep: set[str]) -> set[str]:
        """For local pruning: pending uploads the retention keeps stay; the rest will never be needed
        remotely either (they are older than `keep_last` newer ones), so they are dropped to bound
        the disk. Returns the folders that must stay anyway (the one being uploaded)."""
        return self._state.drop_replaced(keep)

    def early_file(self, name: str, file: str, progress: FileProgress) -> None:
        """`file` of checkpoint `name` is being written locally (`progress` follows it): send it as it
        grows, on the thread; the round that follows the local commit skips it. Without the thread
        (synchronous saves) the round sends everything."""
        if self._thread is not None:
            self._state.push_early((name, file, progress))

    # ------------------------------------------------------------------ sharded saves sent by their ranks
    def add_spread(self, name: str, manifest: Manifest) -> None:
        """Rank 0: a sharded save whose ranks sent their own files (spread.py); the next round sends the
        writer's files and commits `manifest` remotely. Nothing of it is committed locally."""
        self._state.add_spread(name, manifest)

    def send_own_files(self, name: str, files: dict[str, FileEntry], sent: Collection[str] = ()) -> bool:
        """Any rank: its own files of a sharded save but those already `sent`, from its local folder to the store,
        each retried and confirmed by its size (each part's CRC32 is checked by S3 on the way; readers check
        the SHA-256). False if one could not be sent: the save is then not committed."""
        for file in sorted(set(files) - set(sent), key=lambda f: -files[f].size):
            send = lambda f=file: self._files.put_confirmed(name, f, files[f].size)  # noqa: E731
            if self._backoff.run(f"upload of {name}/{file}", send, None) is not None:
                return False
        return True

    def stream_own_file(self, name: str, file: str, progress: FileProgress) -> bool:
        """Any rank: its file of a sharded save sent to S3 part by part while it is written (`progress`), its size
        confirmed; False on other stores or a failure, and send_own_files() sends it whole instead."""
        client = s3_client(self.remote.fs)
        if client is None:
            return False
        bucket, key = self.remote.path(name, file).split("/", 1)
        try:
            entry = stream_to_s3(client, bucket, key, Path(self.local.path(name, file)), progress, self._state.stop)
            if entry is not None:
                self._files.confirm_size(name, file, entry.size)
            return entry is not None
        except Exception as err:
            log.info("upload of %s/%s as it was written failed (%s); sent whole instead", name, file, describe(err),
                     extra=FILE_ONLY)
            return False

    def uncommit_remote(self, name: str) -> bool:
        """Rank 0, before the ranks send a save of step folder `name`: an earlier remote commit of it goes
        first, so its files are never replaced under a committed manifest. False if the store refused."""
        def uncommit() -> None:
            try:
                self._files.uncommit(name)
            except FileNotFoundError:
                pass
        return self._backoff.run(f"removal of the old {name}/{MANIFEST}", uncommit, None) is None

    # ------------------------------------------------------------------ rounds
    def request_round(self) -> int:
        return self._state.request_round()

    def run_round(self, deadline: Optional[float]) -> bool:
        """One round, on the thread if it runs (waiting for it up to `deadline`), else here; True if
        nothing is pending after it."""
        if self._thread is None:
            return self._rounds.run(deadline)
        return self._state.wait_round(self.request_round(), deadline)

    def flush(self, deadline: float) -> bool:
        """Rounds until nothing is pending or `deadline` (time.monotonic()) passes; True if all is up."""
        self._state.deadline = deadline
        try:
            # a folder of another run (the thread's error) ends it at once: retrying cannot help
            while self.pending and time.monotonic() < deadline and not self._state.refused:
                if not self.run_round(deadline):
                    self._state.stop.wait(min(BACKOFF_FIRST_S, max(0.0, deadline - time.monotonic())))
        finally:
            self._state.deadline = None
        return not self.pending

    def _loop(self) -> None:
        while (work := self._state.next_work()) is not None:
            early, ticket, deadline = work
            if early is not None:  # before any round: the round after this save's commit needs it anyway
                self._send_early(*early)
                continue
            try:
                self._rounds.run(deadline)
            except ForeignRunFolder as err:  # raised to the training loop by the next save() or flush()
                self._state.refuse(err)
            except Exception:
                log.exception("checkpoint upload round failed unexpectedly; uploads stay pending")
            self._state.round_done(ticket)

    def _send_early(self, name: str, file: str, progress: FileProgress) -> None:
        if self._state.refused:
            return
        try:
            self._early.send(name, file, progress)
        except ForeignRunFolder as err:
            self._state.refuse(err)

    # ------------------------------------------------------------------ the remote folder
    def list_steps(self) -> dict[str, int]:
        """Remote step folders (committed or not), after checking the folder is this run's; raises
        the last error if the store stays unreachable."""
        found: dict[str, int] = {}

        def listing() -> None:
            self._owner.check(claim=False)  # another run's checkpoints are not this run's to resume from
            found.update(self.remote.step_dirs())

        error = self._backoff.run("listing", listing, None)
        if error is not None:
            raise error
        return found

    def claim_folder(self) -> None:
        """At start: refuse a folder owned by another run before anything is read or written."""
        self._owner.claim_at_start()

    def check_owner(self, claim: bool) -> None:
        """Raise ForeignRunFolder if the remote folder belongs to another run (see owner.py)."""
        self._owner.check(claim)
