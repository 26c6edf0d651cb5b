"""The uploader: sends committed local checkpoints to the remote store and owns that folder.

A checkpoint goes up files first, each confirmed by its size on the store, and its manifest last,
so a half upload is never committed. Each file starts up while the local writer is still writing it
(`early_file`: streamed part by part to S3, jobs/checkpoint/stream.py; sent whole once written to
other stores), so a save's upload overlaps its local write, which counts when a spot notice leaves
seconds to get the checkpoint off the VM. Failures are retried with capped exponential backoff; a
store that is still down leaves the upload pending for the next round (the next save, or flush()),
and training never waits for it. After every pending checkpoint is up, the remote is pruned.

The remote folder belongs to one run: its owner record is written before the first upload and
checked before every round, and a folder of another run is neither read, written nor pruned.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from jobs.checkpoint.errors import FILE_ONLY, ForeignRunFolder, InvalidCheckpoint, describe, log
from jobs.checkpoint.local import POINTER, SavesLog
from jobs.checkpoint.manifest import FileEntry, Manifest
from jobs.checkpoint.retention import prune
from jobs.checkpoint.store import Store
from jobs.checkpoint.stream import FileProgress, stream_to_s3
from jobs.storage import OWNER_FILE, folder_owner, foreign_folder_message, is_local, put_file, s3_client
from jobs.schema.run_dir import MANIFEST
from jobs.schema import CheckpointConfig
from jobs.schema.secrets import redact_text

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 4.0


class Uploader:
    """Upload rounds, on a background thread once start()ed, else inline in the caller."""

    def __init__(self, cfg: CheckpointConfig, local: Store, remote: Store, run_id: Optional[str],
                 saves_log: SavesLog) -> None:
        self.cfg, self.local, self.remote, self.run_id, self.saves_log = cfg, local, remote, run_id, saves_log
        self._lock = threading.Condition()  # guards what both threads touch: pending, uploading, rounds
        self._pending: set[str] = set()  # committed locally, not yet on the remote store
        self._uploading: Optional[str] = None
        self._rounds_requested = self._rounds_done = 0
        self._deadline: Optional[float] = None  # of the flush() in progress: backoff stops there
        self._pointer_step = -1
        self._error: Optional[BaseException] = None
        self._refused = False  # the folder is another run's: nothing more is sent (the error is raised once)
        self._corrupt: set[str] = set()  # found corrupt at load: uploaded again even if the manifest matches
        self._early: deque[tuple[str, str, FileProgress]] = deque()  # files being written locally
        self._early_to: dict[str, bool] = {}  # folder -> whether its files may go up before its commit
        self._sent: dict[str, dict[str, FileEntry]] = {}  # folder -> files already on the store, by early_file
        self._first_sent: dict[str, float] = {}  # folder -> perf_counter() when its first file started up
        self._stop = threading.Event()
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
        with self._lock:
            self._stop.set()
            self._lock.notify_all()
        self._thread.join(timeout=10)
        self._thread = None

    def take_error(self) -> Optional[BaseException]:
        """An error of the background thread the training loop must see (another run's folder)."""
        error, self._error = self._error, None
        return error

    # ------------------------------------------------------------------ what is pending
    @property
    def pending(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def add_pending(self, names: Iterable[str]) -> None:
        with self._lock:
            self._pending.update(names)

    def mark_corrupt(self, name: str) -> None:
        """The remote copy of `name` failed its hashes: upload it again even if its manifest matches."""
        self._corrupt.add(name)

    def drop_replaced(self, keep: set[str]) -> set[str]:
        """For local pruning: pending uploads the retention keeps stay; the rest will never be needed
        remotely either (they are older than `keep_last` newer ones), so they are dropped to bound
        the disk. Returns the folders that must stay anyway (the one being uploaded)."""
        with self._lock:
            dropped = self._pending - keep - {self._uploading}
            if dropped:
                log.info("not uploading %s any more: newer checkpoints replace them", sorted(dropped),
                         extra=FILE_ONLY)
            self._pending -= dropped
            return {self._uploading} if self._uploading else set()

    def early_file(self, name: str, file: str, progress: FileProgress) -> None:
        """`file` of checkpoint `name` is being written locally (`progress` follows it): send it as it
        grows, on the thread; the round that follows the local commit skips it. Without the thread
        (synchronous saves) the round sends everything."""
        if self._thread is None:
            return
        with self._lock:
            self._early.append((name, file, progress))
            self._lock.notify_all()

    # ------------------------------------------------------------------ rounds
    def request_round(self) -> int:
        with self._lock:
            self._rounds_requested += 1
            self._lock.notify_all()
            return self._rounds_requested

    def run_round(self, deadline: Optional[float]) -> bool:
        """One round, on the thread if it runs (waiting for it up to `deadline`), else here; True if
        nothing is pending after it."""
        if self._thread is None:
            return self._upload_round(deadline)
        ticket = self.request_round()
        with self._lock:
            self._lock.wait_for(lambda: self._rounds_done >= ticket,
                                timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not self._pending

    def flush(self, deadline: float) -> bool:
        """Rounds until nothing is pending or `deadline` (time.monotonic()) passes; True if all is up."""
        self._deadline = deadline
        try:
            # a folder of another run (the thread's error) ends it at once: retrying cannot help
            while self.pending and time.monotonic() < deadline and not self._refused:
                if not self.run_round(deadline):
                    self._stop.wait(min(BACKOFF_FIRST_S, max(0.0, deadline - time.monotonic())))
        finally:
            self._deadline = None
        return not self.pending

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stop.is_set() or bool(self._early)
                                    or self._rounds_requested > self._rounds_done)
                if self._stop.is_set():
                    return
                early = self._early.popleft() if self._early else None
                ticket, deadline = self._rounds_requested, self._deadline
            if early is not None:  # before any round: the round after this save's commit needs it anyway
                self._send_early(*early)
                continue
            try:
                self._upload_round(deadline)
            except ForeignRunFolder as err:  # raised to the training loop by the next save() or flush()
                self._refuse(err)
            except Exception:
                log.exception("checkpoint upload round failed unexpectedly; uploads stay pending")
            with self._lock:
                self._rounds_done = ticket
                self._lock.notify_all()

    def _upload_round(self, deadline: Optional[float]) -> bool:
        """Upload pending checkpoints oldest first, then prune the remote. Stops at the first one
        that fails: the store is probably down, and the rest would wait out the same backoff."""
        todo = [] if self._refused else sorted(self.pending)
        # Checked before every round: another run may have claimed the folder since the last one.
        if todo and self._with_backoff("owner check", lambda: self.check_owner(claim=True), deadline) is not None:
            return False
        for name in todo:
            with self._lock:
                if name not in self._pending:
                    continue  # dropped by retention meanwhile
                self._uploading = name
            try:
                ok = self._upload_checkpoint(name, deadline)
            finally:
                with self._lock:
                    self._uploading = None
            if not ok:
                return False
            with self._lock:
                self._pending.discard(name)
        if todo:  # every pending checkpoint is up: nothing half-uploaded to protect
            self._with_backoff("pruning", lambda: prune(self.remote, self.cfg, lambda keep: set()), deadline)
        return True

    def _send_early(self, name: str, file: str, progress: FileProgress) -> None:
        """One try, no backoff: a file that does not go up now is sent by the round, with retries."""
        if self._refused:
            return
        try:
            if name not in self._early_to:
                self.check_owner(claim=True)
                # a committed copy of this step is there (a save of it before a restart): its files may not
                # change under its manifest, so the round uncommits it first and sends everything
                self._early_to[name] = self._remote_manifest(name) is None
            if not self._early_to[name]:
                return
            self._first_sent.setdefault(name, time.perf_counter())
            entry = self._send_growing(name, file, progress)
            if entry is not None:
                self._sent.setdefault(name, {})[file] = entry
        except ForeignRunFolder as err:
            self._refuse(err)
        except Exception as err:
            log.info("upload of %s/%s as it was written failed (%s); the upload round sends it", name, file,
                     describe(err), extra=FILE_ONLY)

    def _send_growing(self, name: str, file: str, progress: FileProgress) -> Optional[FileEntry]:
        """The file on the store once the writer is done with it, its size confirmed; None if the writer
        failed or the uploader is stopping."""
        client, target = s3_client(self.remote.fs), self.remote.path(name, file)
        if client is not None:
            bucket, key = target.split("/", 1)
            entry = stream_to_s3(client, bucket, key, Path(self.local.path(name, file)), progress, self._stop)
        else:
            progress.wait_end(self._stop)  # other stores get the whole file
            entry = progress.entry
            if entry is not None and not self._stop.is_set():
                self._put_confirmed(name, file, entry.size)
                return entry
        if entry is not None:
            self._confirm_size(name, file, entry.size)
        return entry

    def _refuse(self, err: ForeignRunFolder) -> None:
        if not self._refused:
            log.error("%s", err)
            self._refused, self._error = True, err

    def _already_sent(self, name: str, file: str, entry: FileEntry) -> bool:
        """Sent by early_file with these bytes, and still there at that size (one HEAD request)."""
        if self._sent.get(name, {}).get(file) != entry:
            return False
        try:
            return self._size_on_store(name, file) == entry.size
        except Exception:
            return False

    # ------------------------------------------------------------------ one checkpoint
    def _upload_checkpoint(self, name: str, deadline: Optional[float]) -> bool:
        """Files first, each confirmed by its size on the store; the manifest only after all."""
        try:
            manifest = self.local.verify(name, full_hash=False)
        except (InvalidCheckpoint, FileNotFoundError) as err:
            log.warning("cannot upload %s: its local copy is gone or invalid (%s)", self.local.location(name), err)
            self._forget_early(name)
            return True  # nothing left to upload; do not block the others
        started = time.perf_counter()
        there = self._remote_manifest(name)
        if there is not None and there.files == manifest.files and name not in self._corrupt:
            return True  # uploaded before a restart
        if there is not None:  # another save of this step: uncommit it before replacing its files
            uncommit = lambda: self.remote.fs.rm_file(self.remote.path(name, MANIFEST))  # noqa: E731
            if not self._retry(f"removal of the old {name}/{MANIFEST}", uncommit, deadline):
                return False
        for file, entry in manifest.files.items():
            if self._already_sent(name, file, entry):
                continue
            send = lambda f=file, e=entry: self._put_confirmed(name, f, e.size)  # noqa: E731
            if not self._retry(f"upload of {name}/{file}", send, deadline):
                return False
        commit = lambda: self._put_text(name, MANIFEST, manifest.to_json())  # noqa: E731
        if not self._retry(f"upload of {name}/{MANIFEST}", commit, deadline):
            return False
        first_sent = self._forget_early(name)
        if first_sent is not None:  # its first file went up as it was written
            started = min(started, first_sent)
        self._after_upload(name, manifest, time.perf_counter() - started)
        return True

    def _forget_early(self, name: str) -> Optional[float]:
        """Drop what early_file noted of checkpoint `name` (it is up, or will never be); when its first
        file started up, if one did."""
        self._sent.pop(name, None)
        self._early_to.pop(name, None)
        return self._first_sent.pop(name, None)

    def _remote_manifest(self, name: str) -> Optional[Manifest]:
        try:
            return Manifest.from_json(self.remote.fs.cat_file(self.remote.path(name, MANIFEST)))
        except Exception:
            return None  # absent, unreadable or unreachable: upload it (with retries)

    def _put_confirmed(self, name: str, file: str, size: int) -> None:
        remote = self.remote
        target = remote.path(name, file)
        if is_local(remote.fs):
            remote.fs.makedirs(remote.path(name), exist_ok=True)
        put_file(remote.fs, self.local.path(name, file), target)
        self._confirm_size(name, file, size)

    def _size_on_store(self, name: str, file: str) -> int:
        """The file's size as the store has it now (one HEAD request; fsspec's listing cache bypassed)."""
        target = self.remote.path(name, file)
        self.remote.fs.invalidate_cache(target)
        return self.remote.fs.info(target)["size"]

    def _confirm_size(self, name: str, file: str, size: int) -> None:
        landed = self._size_on_store(name, file)
        if landed != size:
            raise OSError(f"{self.remote.location(name)}/{file} has {landed} bytes after upload, expected {size}")

    def _put_text(self, name: str, file: str, text: str) -> None:
        """A single PUT is atomic on object stores; a local-disk remote needs the rename."""
        remote = self.remote
        target = remote.path(name, file) if name else remote.path(file)
        if is_local(remote.fs):
            remote.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            remote.fs.pipe_file(target + ".tmp", text.encode())
            remote.fs.mv(target + ".tmp", target)
        else:
            remote.fs.pipe_file(target, text.encode())

    def _after_upload(self, name: str, manifest: Manifest, upload_s: float) -> None:
        log.info("checkpoint step %d committed to %s in %.3f s (%.1f MB)", manifest.step,
                 self.remote.location(name), upload_s, manifest.total_bytes / 1e6, extra=FILE_ONLY)
        self._corrupt.discard(name)
        self.saves_log.append({"event": "upload", "step": manifest.step, "upload_s": round(upload_s, 4),
                               "bytes": manifest.total_bytes, "time": time.time()})
        if manifest.step > self._pointer_step:  # a pointer is only a hint, but never move it backwards
            self._pointer_step = manifest.step
            self._with_backoff("pointer update", lambda: self._put_text("", POINTER, name + "\n"), None)

    # ------------------------------------------------------------------ retries
    def _with_backoff(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> Optional[Exception]:
        """Run `action` up to `upload_retries` times with exponential backoff (capped, and cut
        short by `deadline` or stop()); None once it worked, else the last error."""
        attempts, attempt = self.cfg.upload_retries, 0
        while True:
            attempt += 1
            try:
                action()
                return None
            except ForeignRunFolder:
                raise  # not a store failure: retrying does not change who owns the folder
            except Exception as err:
                delay = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_CAP_S)
                last = attempt >= attempts or (deadline is not None and time.monotonic() + delay > deadline)
                log.log(logging.WARNING if last else logging.INFO, "%s at %s failed (attempt %d/%d): %s",
                        what, redact_text(self.remote.uri), attempt, attempts, describe(err))
                if last or self._stop.wait(delay):
                    return err

    def _retry(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> bool:
        if self._with_backoff(what, action, deadline) is None:
            return True
        log.warning("%s left pending: retried at the next save and by flush()", what)
        return False

    # ------------------------------------------------------------------ the remote folder
    def list_steps(self) -> dict[str, int]:
        """Remote step folders (committed or not), after checking the folder is this run's; raises
        the last error if the store stays unreachable."""
        found: dict[str, int] = {}

        def listing() -> None:
            self.check_owner(claim=False)  # another run's checkpoints are not this run's to resume from
            found.update(self.remote.step_dirs())

        error = self._with_backoff("listing", listing, None)
        if error is not None:
            raise error
        return found

    def claim_folder(self) -> None:
        """At start: refuse a folder owned by another run before anything is read or written.
        A store that cannot be reached now is checked again before the first upload."""
        try:
            self.check_owner(claim=True)
        except ForeignRunFolder:
            raise
        except Exception as err:
            log.warning("cannot check which run owns %s now (%s); checked again before the first upload",
                        redact_text(self.remote.uri), describe(err))

    def check_owner(self, claim: bool) -> None:
        """Raise ForeignRunFolder if the remote folder belongs to another run. With `claim`, a
        folder no run owns yet gets this run's owner record."""
        if self.run_id is None:
            return
        remote = self.remote
        try:
            owner = folder_owner(remote.fs, remote.root)
        except ValueError as err:
            raise ForeignRunFolder(f"cannot tell which run owns {redact_text(remote.uri)}: {err}. If the folder "
                                   f"is this run's (id {self.run_id}), delete {OWNER_FILE} there") from None
        if owner is None and claim:
            self._put_text("", OWNER_FILE, json.dumps({"run_id": self.run_id, "created": time.time()}) + "\n")
            log.info("%s now belongs to run %s (%s)", redact_text(remote.uri), self.run_id, OWNER_FILE,
                     extra=FILE_ONLY)
        elif owner is not None and owner != self.run_id:
            message, hint = foreign_folder_message(remote.uri, owner, f"this run (id {self.run_id})")
            raise ForeignRunFolder(f"{message}\n  HINT: {hint}")
