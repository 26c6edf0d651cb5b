"""`Checkpointer`: saves, finds and loads the checkpoints of one run by composing the package's
parts (see jobs/checkpoint/__init__.py for the protocol): host staging and the background saver,
the local writer, the uploader, retention and the reader."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from fsspec.implementations.local import LocalFileSystem

from jobs.checkpoint.errors import FILE_ONLY, CheckpointError, CorruptCheckpoint, ForeignRunFolder, \
    InvalidCheckpoint, describe, log
from jobs.checkpoint.disk import SavesLog
from jobs.checkpoint.layout import MANIFEST, SAVES_LOG, FileEntry, Manifest, step_dir_name
from jobs.checkpoint.local import LocalWriter
from jobs.checkpoint.policy import SavePolicy
from jobs.checkpoint.reader import load_checkpoint
from jobs.checkpoint.retention import prune, retained
from jobs.checkpoint.saver import BackgroundSaver, SaveJob
from jobs.checkpoint.sharded import DCP_METADATA, FetchingReader, ShardedSaver, ShardJob, failure_reason, \
    is_shard_file, only_corrupt_files
from jobs.checkpoint.staging import check_leaves, check_state, copy_tree
from jobs.checkpoint.spread import NodeCopy, fetch_once
from jobs.checkpoint.store import Store
from jobs.checkpoint.uploader import Uploader
from jobs.storage import filesystem
from jobs.schema import CheckpointConfig, StorageConfig


class Checkpointer:
    """Saves, finds and loads checkpoints of one run.

    Only the writer (rank 0) writes: on other ranks save() does nothing and flush() returns True,
    so the trainer can call them on every rank. Every rank may call latest() and load(). With
    `sharded`, every rank writes its shard of what save() is given as `shards` (see
    jobs/checkpoint/sharded.py) and rank 0 commits them with its own files.

    `policy` decides when a save is due and which value of best_metric is the best; every rank
    keeps its own (its clock restarts at each save()), and the trainer asks it.

    With a `run_id`, the remote folder belongs to that run: its owner record (`run-owner.json`) is
    written before the first upload, and a folder owned by another run is neither read, written
    nor pruned (ForeignRunFolder).
    """

    def __init__(self, cfg: CheckpointConfig, local_dir: Path, remote: str | None, storage: StorageConfig,
                 is_writer: bool = True, run_id: Optional[str] = None, sharded: bool = False,
                 spread: bool = False) -> None:
        self.cfg, self.storage, self.is_writer, self.run_id = cfg, storage, is_writer, run_id
        self.local_dir = Path(local_dir).absolute()
        self.policy = SavePolicy(cfg)
        self.remote_uri = remote.rstrip("/") if remote else None
        self._local = Store(LocalFileSystem(), str(self.local_dir), str(self.local_dir))
        self._saves_log = SavesLog(self.local_dir / SAVES_LOG)
        self._writer = LocalWriter(self._local, run_id)
        self._uploader: Optional[Uploader] = None  # the remote side: listing, owner, uploads
        if remote:
            fs, root = filesystem(remote, storage)
            self._uploader = Uploader(cfg, self._local, Store(fs, root, self.remote_uri or remote), run_id,
                                      self._saves_log)
        self._saver: Optional[BackgroundSaver] = None
        # sharded saves (every rank writes its shard): created on every rank, a collective. `spread`: the
        # nodes share no folder, so each rank sends its own files to the store (spread.py)
        if spread and (not sharded or self._uploader is None):
            raise CheckpointError("a sharded checkpoint of nodes that share no folder needs checkpoint.uri on an "
                                  "object store: each rank sends its shard there")
        self.spread = spread
        self._shards = ShardedSaver(dist.get_rank(), self._commit_sharded if is_writer else None,
                                    cfg.async_save, uploads=self._uploader if spread else None,
                                    keep_local=cfg.keep_last) if sharded else None
        self._submitted: set[int] = set()
        self._closed = False
        if is_writer:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            if self._uploader is not None:
                self._uploader.claim_folder()
                self._uploader.add_pending(self._not_yet_uploaded())
            if cfg.async_save:
                self._saver = BackgroundSaver(cfg.queue_size, self._commit, str(self.local_dir))
                if self._uploader is not None:
                    self._uploader.start()

    # ------------------------------------------------------------------ public API
    @property
    def sharded(self) -> bool:
        """Whether every rank writes its shard (save() takes `shards`)."""
        return self._shards is not None

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float],
             shards: Optional[dict[str, Any]] = None) -> None:
        """Checkpoint `state` (name -> object, one file each) at `step`. Async: returns once the
        tensors are copied to host memory; blocks while `queue_size` saves are already waiting.

        `shards` (a sharded Checkpointer, every rank calls save()): this rank's shard of the state
        (DTensors or a pipeline stage's tensors), written with DCP next to rank 0's `state`."""
        if shards is not None:
            self._save_sharded(step, state, metrics, shards)
        elif self.is_writer:
            self._save_whole(step, state, metrics)
        self.policy.restart_clock()  # every_minutes counts from the end of this save, on every rank

    def _save_whole(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        if self._closed:
            raise CheckpointError(f"save(step={step}) after close(): create a new Checkpointer for {self.local_dir}")
        self._raise_background_error()
        job = SaveJob(step, state, check_state(state, metrics), time.perf_counter())
        name = step_dir_name(step)  # refuses a negative step here, not on the saver's thread
        if step in self._submitted:
            log.info("checkpoint %s was already saved by this run; not saving it again", name)
            return
        if self._saver is None:
            check_leaves(state)  # the same refusals as the async path's snapshot
            self._save_now(job)
        else:
            self._saver.submit(job)
        self._submitted.add(step)

    def latest(self) -> str | None:
        """Location (local path or remote URI) of the newest committed, intact checkpoint, or None.

        Scans every `step-*` folder of both stores, newest first (the local copy first on a tie:
        it is faster), and skips invalid ones with a warning. Local copies are checked against
        their SHA-256; remote ones by size (load() checks the hashes as it downloads). To load
        the checkpoint too, load_latest() reads every file once instead of twice.
        """
        found = self._find(skip=set(), full_hash=True)
        return found[0].location(found[1]) if found else None  # type: ignore[index]

    def load_latest(self, map_location: str | torch.device = "cpu", keys: Optional[Collection[str]] = None,
                    remote_only: bool = False) -> Optional[tuple[str, dict[str, Any]]]:
        """(location, state) of the newest checkpoint that loads, or None. The newest committed one
        is chosen by its sizes and its files checked against their SHA-256 as they are read; one
        that does not match is skipped for the next older one. `remote_only`: choose among the
        remote copies only, for a run whose other nodes cannot read this node's folder (they load
        the location returned)."""
        skipped: set[str] = set()
        while (found := self._find(skipped, full_hash=False, remote_only=remote_only)) is not None:
            store, name, manifest = found
            location = read_from = store.location(name)
            try:
                if store is not self._local and any(is_shard_file(f) for f in manifest.files):
                    read_from = self._download(store, name, manifest)  # DCP reads shards from a local folder
                return location, load_checkpoint(read_from, self.storage, map_location, keys)
            except CorruptCheckpoint as err:
                log.warning("skipping checkpoint %s: %s", location, err)
                skipped.add(store.location(name))
                if self._uploader is not None and store is not self._local:
                    self._uploader.mark_corrupt(name)  # replaced by the local copy, if there is one
        return None

    def _download(self, remote: Store, name: str, manifest: Manifest) -> str:
        """A remote sharded checkpoint copied into the local folder and committed there, every file
        checked against the manifest on the way (one rank of a node copies it); returns the local folder."""
        log.info("downloading sharded checkpoint %s (%.1f MB)", remote.location(name), manifest.total_bytes / 1e6)
        fetch_once(remote, name, manifest, self.local_dir / name)
        return str(self.local_dir / name)

    def local_copy(self, location: str) -> str:
        """Where this node reads checkpoint `location` from: a remote sharded checkpoint (DCP reads
        shards from a local folder) copied into this node's folder, once per node; anything else as is.
        Every rank may call it; raises CorruptCheckpoint for a file that does not match its manifest."""
        remote = self._uploader.remote if self._uploader is not None else None
        name = location.rstrip("/").rsplit("/", 1)[-1]
        if remote is None or location != remote.location(name):
            return location
        manifest = Manifest.from_json(remote.fs.cat_file(remote.path(name, MANIFEST)))
        if not any(is_shard_file(f) for f in manifest.files):
            return location
        return self._download(remote, name, manifest)

    def resume_spread(self, apply: Callable[[dict[str, Any], FetchingReader], None]) -> Optional[str]:
        """Every rank of a spread run (spread.py), a collective: the newest remote checkpoint that reads intact,
        given to `apply(state, reader)` (rank 0's small files; DCP's reader fetching this rank's shards into
        the node's folder as its read plan asks). A file that does not match its manifest, on any rank, moves
        every rank to the next older checkpoint. Returns the location loaded, None if there is none."""
        assert self._uploader is not None
        skip: set[str] = set()
        while True:
            found: list[Any] = [None]
            if self.is_writer and (newest := self._find(skip, full_hash=False, remote_only=True)) is not None:
                found = [(newest[0].location(newest[1]), newest[1], newest[2].to_json())]
            dist.broadcast_object_list(found, src=0)
            if found[0] is None:
                return None
            location, name, text = found[0]
            copy = NodeCopy(self._uploader.remote, name, Manifest.from_json(text), self.local_dir / name)
            plain = [f for f in copy.manifest.files if not is_shard_file(f)]
            problem: Optional[str] = None
            try:
                copy.fetch([*plain, DCP_METADATA])
                state = {f.removesuffix(".pt"): torch.load(copy.folder / f, map_location="cpu", weights_only=True)
                         for f in plain}
            except CorruptCheckpoint as err:
                problem = str(err)
            problems: list[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)  # every rank enters DCP's load, or none
            try:
                if any(problems):
                    raise CorruptCheckpoint(next(p for p in problems if p))
                apply(state, FetchingReader(str(copy.folder), copy.fetch))
                return location
            except (Exception, CheckpointException) as err:
                if not only_corrupt_files(err):
                    raise
                if self.is_writer:  # DCP's exception is every rank's: one line
                    log.warning("skipping checkpoint %s: %s", location, failure_reason(err))
                skip.add(location)

    def load(self, location: str, map_location: str | torch.device = "cpu", keys: Optional[Collection[str]] = None,
             hash_local: bool = True) -> dict[str, Any]:
        """name -> object of the checkpoint at `location` (from latest()); `keys` limits the files read.

        Every file's size and SHA-256 is checked as it is read. `hash_local=False` checks only the
        sizes of local files, for a rank whose node-mate (local rank 0) hashes or hashed the same
        files: several ranks of a node loading one checkpoint hash it once. Downloads are always
        hashed: each can differ.
        """
        return load_checkpoint(location, self.storage, map_location, keys, hash_local)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` s (default checkpoint.flush_timeout_s) for queued saves and pending
        uploads. True when everything is committed locally and, with a remote, remotely, and
        not every save of this run failed to write."""
        deadline = time.monotonic() + (self.cfg.flush_timeout_s if timeout is None else timeout)
        if self._shards is not None:
            self._shards.wait_idle(deadline)
        if not self.is_writer:
            return True
        if self._saver is not None:
            self._saver.wait_idle(deadline)
        if self._uploader is not None:
            self._uploader.flush(deadline)
        self._raise_background_error()
        saved = (self._saver is None or self._saver.idle) and (self._shards is None or self._shards.idle)
        uploaded = self._uploader is None or not self._uploader.pending
        return saved and uploaded and not self._writer.nothing_saved

    def close(self) -> None:
        """Finish queued local saves and stop the background threads. Does not wait for uploads:
        call flush() first; what is still pending is uploaded by the next Checkpointer on this
        local_dir."""
        if self._saver is not None and not self._closed:
            self._saver.close()
        if self._shards is not None and not self._closed:
            self._shards.close()
        self._closed = True
        if self._uploader is not None:
            self._uploader.stop()
            if self._uploader.pending:
                log.warning("checkpoints %s were not uploaded to %s; they stay in %s and are uploaded by the "
                            "next run using that folder", sorted(self._uploader.pending), self.remote_uri,
                            self.local_dir)
        self._raise_background_error()

    # ------------------------------------------------------------------ saving
    def _save_sharded(self, step: int, state: dict[str, Any], metrics: dict[str, float],
                      shards: dict[str, Any]) -> None:
        if self._shards is None:
            raise CheckpointError("save(shards=...) needs a Checkpointer created with sharded=True on every rank")
        if self._closed:
            raise CheckpointError(f"save(step={step}) after close(): create a new Checkpointer for {self.local_dir}")
        self._raise_background_error()
        started = time.perf_counter()
        metrics = check_state(state, metrics) if self.is_writer else {}
        name = step_dir_name(step)
        if step in self._submitted:  # every rank keeps the same record: they all skip it
            log.info("checkpoint %s was already saved by this run; not saving it again", name)
            return
        small = {k: copy_tree(v, k, lambda t, where: t.detach().to("cpu", copy=True)) for k, v in state.items()} \
            if self.is_writer else {}
        self._shards.submit(ShardJob(step, self.local_dir / name, small, metrics, started), shards)
        self._submitted.add(step)

    def _commit_sharded(self, job: ShardJob, shards: Optional[dict[str, FileEntry]]) -> None:
        """Rank 0, once every rank confirmed its shard: its own files, then the manifest over all
        (`shards` None: a rank could not write or confirm its shard, and this save failed)."""
        if shards is None:
            self._writer.count(committed=False)
            return
        try:
            manifest = self._writer.commit(job.step, job.state, job.metrics, shards=shards, here=not self.spread)
            if manifest is not None and self.spread:
                self._after_spread_save(job, manifest)
            elif manifest is not None:
                self._after_local_commit(job, manifest)
        finally:
            if self._uploader is not None:
                if self.cfg.async_save:
                    self._uploader.request_round()
                else:
                    self._uploader.run_round(None)

    def _save_now(self, job: SaveJob) -> None:
        """Synchronous save: commit locally, upload (with retries) and prune, all before returning."""
        manifest = self._writer.commit(job.step, job.state, job.metrics)
        job.blocked_s = time.perf_counter() - job.started
        if manifest is not None:
            self._after_local_commit(job, manifest)
            if self._uploader is not None:
                self._uploader.run_round(None)

    def _commit(self, job: SaveJob) -> None:
        """An async save, on the saver's thread; each file goes up to the store as it is written."""
        name, uploader = step_dir_name(job.step), self._uploader
        on_file = None if uploader is None else lambda file, progress: uploader.early_file(name, file, progress)
        try:
            manifest = self._writer.commit(job.step, job.state, job.metrics, on_file=on_file)
            if manifest is not None:
                self._after_local_commit(job, manifest)
        finally:
            if self._uploader is not None:
                self._uploader.request_round()

    def _after_local_commit(self, job: SaveJob | ShardJob, manifest: Manifest) -> None:
        commit_s = time.perf_counter() - job.started
        log.info("checkpoint step %d committed to %s in %.3f s (%.1f MB; training blocked %.3f s)",
                 job.step, self.local_dir, commit_s, manifest.total_bytes / 1e6, job.blocked_s, extra=FILE_ONLY)
        self._saves_log.append({"event": "save", "step": job.step, "blocked_s": round(job.blocked_s, 4),
                                "commit_s": round(commit_s, 4), "bytes": manifest.total_bytes,
                                "async": self.cfg.async_save, "time": manifest.created})
        if self._uploader is None:
            prune(self._local, self.cfg, lambda keep: set())
            return
        self._uploader.add_pending([step_dir_name(job.step)])
        prune(self._local, self.cfg, self._uploader.drop_replaced)

    def _after_spread_save(self, job: ShardJob, manifest: Manifest) -> None:
        """Every rank sent its shard: the uploader sends rank 0's files and commits the remote folder."""
        assert self._uploader is not None
        log.info("checkpoint step %d: every rank's shard is on %s (%.1f MB; training blocked %.3f s); "
                 "committing it there", job.step, self.remote_uri, manifest.total_bytes / 1e6, job.blocked_s,
                 extra=FILE_ONLY)
        self._saves_log.append({"event": "save", "step": job.step, "blocked_s": round(job.blocked_s, 4),
                                "commit_s": round(time.perf_counter() - job.started, 4),
                                "bytes": manifest.total_bytes, "async": self.cfg.async_save, "time": manifest.created})
        self._uploader.add_spread(step_dir_name(job.step), manifest)

    def _not_yet_uploaded(self) -> set[str]:
        """At start, every retained local checkpoint may be missing remotely (a crash before its
        upload); the uploader checks each remote manifest before sending anything."""
        _, manifests = self._local.committed()
        return retained(manifests, self.cfg) if manifests else set()

    def _raise_background_error(self) -> None:
        for part in (self._saver, self._uploader, self._shards):
            error = part.take_error() if part is not None else None
            if error is not None:
                raise error

    # ------------------------------------------------------------------ finding
    def _find(self, skip: set[str], full_hash: bool,
              remote_only: bool = False) -> Optional[tuple[Store, str, Manifest]]:
        """The newest valid checkpoint of both stores (or the remote one) not in `skip` (locations), as
        (store, folder). Local copies are hashed with `full_hash`; remote ones are checked by size."""
        local = {} if remote_only else self._local.step_dirs()
        candidates = [(step, 0, self._local, name) for name, step in local.items()]
        remote_error = None
        if self._uploader is not None:
            remote = self._uploader.remote
            try:
                candidates += [(s, 1, remote, n) for n, s in self._uploader.list_steps().items()]
            except ForeignRunFolder:
                raise
            except Exception as err:
                remote_error = err
        candidates = [c for c in candidates if c[2].location(c[3]) not in skip]
        found = self._first_valid(sorted(candidates, key=lambda c: (-c[0], c[1])), full_hash)
        if remote_error is not None:
            self._report_unreachable(remote_error, found[0].location(found[1]) if found else None)
        return found

    def _first_valid(self, candidates: list[tuple[int, int, Store, str]],
                     full_hash: bool) -> Optional[tuple[Store, str, Manifest]]:
        for _, _, store, name in candidates:
            try:
                return store, name, store.verify(name, full_hash=full_hash and store is self._local)
            except InvalidCheckpoint as err:
                log.warning("skipping checkpoint %s: %s", store.location(name), err)
            except Exception as err:  # a store failing mid-scan, a folder deleted by retention meanwhile
                log.warning("skipping checkpoint %s: cannot read it (%s)", store.location(name), describe(err))
        return None

    def _report_unreachable(self, err: BaseException, found: str | None) -> None:
        """Resuming from nothing while the store may hold newer checkpoints would silently restart
        training: that is an error. A local checkpoint is used, with a warning."""
        if found is None:
            raise CheckpointError(f"cannot list checkpoints at {self.remote_uri} ({describe(err)}) and there is no "
                                  f"local one in {self.local_dir}: starting from scratch could discard the run. "
                                  f"Check storage.endpoint_url and the credentials, or wait for the store")
        log.warning("cannot list checkpoints at %s (%s); resuming from the local %s, which may be older",
                    self.remote_uri, describe(err), found)
