"""Sharded checkpoints: every rank writes its own shard of the model and optimizer state with
torch.distributed.checkpoint (DCP), and one manifest commits them all.

A step folder of a sharded save holds DCP's files next to rank 0's plain ones:

    step-N/__0_0.distcp, __1_0.distcp, ...   each rank's shard (DCP, one file per rank)
    step-N/.metadata                          DCP's index of every shard (written by rank 0)
    step-N/trainer.pt, rng.pt, ...            rank 0's small state, one torch.save file per key
    step-N/manifest.json                      written last, by rank 0, naming every file above

The commit protocol is the one of whole checkpoints, extended to several writers:
1. rank 0 uncommits the folder (an earlier save of this step), then every rank enters DCP's save,
   whose first collective keeps the others from writing before that;
2. every rank writes and fsyncs its shard; DCP writes `.metadata` once all shards are written;
3. every rank hashes the files it wrote and sends their sizes and SHA-256 to rank 0;
4. rank 0 writes its own files and then the manifest, only if every rank confirmed its files.
A rank killed anywhere before 4 leaves a folder without a manifest: it does not exist for
`latest()`, which resumes from the previous committed step. A missing or altered shard fails the
manifest's check like any other file.

The save runs on one background thread per rank, with its own gloo process group: DCP's
collectives and the confirmations never share a group with training's collectives (sharing one is
a known deadlock). Training waits only for the copy of its shard into host memory (shard_staging:
buffers kept across saves, several copy threads). One save is in flight per rank; the next waits for
it, as the buffers it would copy into are still being written.

Uploads are not DCP's: its fsspec writer has lost data on object stores. The committed folder is
uploaded by the Checkpointer's uploader, files first and manifest last, like any checkpoint. Nodes
that share no folder (VMs) commit nowhere locally: each rank sends its own files (spread.py).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from jobs.checkpoint.errors import FILE_ONLY, CheckpointError, CorruptCheckpoint, describe, log
from jobs.checkpoint.layout import MANIFEST, FileEntry
from jobs.checkpoint.spread import OwnShard, prune_node_folder
from jobs.checkpoint.stream import FileProgress
from jobs.checkpoint.shard_staging import ShardStager, copy_threads
from jobs.checkpoint.store import sha256_of
from jobs.env import RankEnv
from jobs.parallel.distributed import gloo_group

DCP_METADATA = ".metadata"


def is_shard_file(name: str) -> bool:
    """Whether a manifest entry is DCP's (a shard or its index) rather than one torch.save file per key."""
    return not name.endswith(".pt")


@dataclass
class ShardJob:
    step: int
    folder: Path
    state: dict[str, Any]  # rank 0's small state (host copies), written next to the shards
    metrics: dict[str, float]
    started: float  # perf_counter at save() entry
    blocked_s: float = 0.0  # how long training waited for this save
    sent: set[str] = field(default_factory=set)  # this rank's files already on the store (spread.py)
    shards: dict[str, Any] = field(default_factory=dict)  # the staged shard state


class OwnUploads(Protocol):
    """The store side of a save whose ranks send their own files (the Uploader, see spread.py)."""

    def uncommit_remote(self, name: str) -> bool: ...

    def send_own_files(self, name: str, files: dict[str, FileEntry], sent: Collection[str] = ()) -> bool: ...

    def stream_own_file(self, name: str, file: str, progress: FileProgress) -> bool: ...

    @property
    def pending(self) -> set[str]: ...


class _RecordingWriter(dcp.FileSystemWriter):
    """DCP's file writer, noting which files this rank wrote (the manifest names them, by rank)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
        self.written: set[str] = set()

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        future.wait()
        self.written |= {r.storage_data.relative_path for r in future.value()}
        return future


class ShardedSaver:
    """One rank's side of sharded saves. Every rank creates one (creating its process group is a
    collective) and calls submit() for every save, in the same order. On rank 0 `commit` receives
    the job and every rank's confirmed files, and commits the folder (or None: the save failed)."""

    def __init__(self, rank: int, commit: Optional[Callable[[ShardJob, Optional[dict[str, FileEntry]]], None]],
                 asynchronous: bool = True, uploads: Optional[OwnUploads] = None, keep_local: int = 1) -> None:
        self.rank, self.commit, self.asynchronous = rank, commit, asynchronous
        self.uploads, self.keep_local = uploads, keep_local  # every rank sends its own files (spread.py)
        self.group = gloo_group()  # never shared with training's collectives
        # the ranks of this machine copy at the same moment: each gets its share of the CPUs
        self._stager = ShardStager(copy_threads(RankEnv.from_environ().local_world_size))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-shards")
        self._pending: Optional[Future] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: ShardJob, shards: dict[str, Any]) -> None:
        """Copy this rank's shard to host memory and write it in the background (or now, when not
        asynchronous). Waits first for this rank's previous save: its host buffers are reused."""
        self.wait_idle(None)
        job.shards = self._stager.stage(shards)
        job.blocked_s = time.perf_counter() - job.started
        if not self.asynchronous:
            self._write(job)
            return
        log.info("checkpoint step %d: training blocked %.3f s for the shard's host copy", job.step, job.blocked_s,
                 extra=FILE_ONLY)
        self._pending = self._pool.submit(self._write, job)

    def wait_idle(self, deadline: Optional[float]) -> bool:
        """Wait for the save in flight, up to `deadline` (time.monotonic(); None: as long as it takes)."""
        pending = self._pending
        if pending is None:
            return True
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            pending.result(timeout=timeout)
        except TimeoutError:
            return False
        self._pending = None
        return True

    @property
    def idle(self) -> bool:
        return self._pending is None or self._pending.done()

    def take_error(self) -> Optional[BaseException]:
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        self.wait_idle(None)
        self._pool.shutdown(wait=True)
        self._stager.close()

    # ------------------------------------------------------------------ on the saver's thread
    def _write(self, job: ShardJob) -> None:
        try:
            entries = self._write_shard(job)
            if entries is not None and self.uploads is not None:
                entries = self._send_own(job, entries)
        except (Exception, CheckpointException) as err:  # DCP raises on every rank when one rank's write fails
            if self.rank == 0:  # every rank got the same exception: one line says it
                log.error("checkpoint step %d NOT saved: writing the shards into %s failed (%s); training "
                          "continues and the next save tries again", job.step, job.folder, failure_reason(err))
            self._commit(job, None)
            return
        finally:
            job.shards = {}
            self._stager.release()
        everyone: Optional[list[Any]] = [None] * dist.get_world_size(self.group) if self.rank == 0 else None
        dist.gather_object(entries, everyone, dst=0, group=self.group)
        if everyone is None:
            return
        missing = [r for r, e in enumerate(everyone) if e is None]
        if missing:
            log.error("checkpoint step %d NOT committed: ranks %s could not confirm their shards", job.step, missing)
            self._commit(job, None)
            return
        self._commit(job, {name: entry for e in everyone for name, entry in e.items()})

    def _commit(self, job: ShardJob, files: Optional[dict[str, FileEntry]]) -> None:
        """Rank 0: hand every rank's confirmed files to `commit` (None: the save failed, counted as such)."""
        if self.commit is None:
            return
        try:
            self.commit(job, files)
        except BaseException as err:
            self._error = self._error or CheckpointError(f"committing sharded step {job.step} failed: {err}")

    def _send_own(self, job: ShardJob, entries: dict[str, FileEntry]) -> Optional[dict[str, FileEntry]]:
        """This rank's files sent to the store by this rank (None if they could not be: not committed),
        then this node's older step folders dropped (spread.py)."""
        assert self.uploads is not None
        sent = self.uploads.send_own_files(job.folder.name, entries, job.sent)
        if not sent:
            log.error("checkpoint step %d: rank %d could not send its shard to the store; the save is not "
                      "committed", job.step, self.rank)
        prune_node_folder(job.folder.parent, self.keep_local, self.uploads.pending)
        return entries if sent else None

    def _write_shard(self, job: ShardJob) -> Optional[dict[str, FileEntry]]:
        """DCP's save of this rank's shard, then its files' sizes and hashes (None if they cannot be read)."""
        uncommitted = True
        if self.rank == 0:
            (job.folder / MANIFEST).unlink(missing_ok=True)  # uncommit an earlier save of this step first
            if self.uploads is not None:  # and its remote copy, before any rank replaces a file of it
                uncommitted = self.uploads.uncommit_remote(job.folder.name)
        job.folder.mkdir(parents=True, exist_ok=True)
        writer = _RecordingWriter(job.folder)
        own = OwnShard(self.uploads, job.folder, self.rank) if self.uploads is not None and uncommitted else None
        if own is not None:
            own.start()
        known: dict[str, FileEntry] = {}  # hashed as DCP wrote them
        started = time.perf_counter()
        try:
            dcp.save(job.shards, storage_writer=writer, process_group=self.group)  # every rank enters it, always
        finally:
            written = time.perf_counter()
            if own is not None:
                entry, sent = own.finish(own.file in writer.written)
                known, job.sent = ({own.file: entry}, {own.file} if sent else set()) if entry else ({}, set())
                log.info("checkpoint step %d: rank %d wrote its shard in %.2f s; %s %.2f s later", job.step,
                         self.rank, written - started, "on the store" if sent else "not streamed to the store",
                         time.perf_counter() - written, extra=FILE_ONLY)
        if not uncommitted:
            log.error("checkpoint step %d NOT committed: its earlier copy on the store could not be uncommitted",
                      job.step)
            return None
        files = sorted(writer.written | ({DCP_METADATA} if self.rank == 0 else set()))
        try:
            return {name: known.get(name) or _hashed(job.folder / name, self.rank) for name in files}
        except OSError as err:
            log.error("checkpoint step %d: rank %d cannot read back its shard (%s)", job.step, self.rank,
                      describe(err))
            return None


def failure_reason(err: BaseException) -> str:
    """One line: DCP's CheckpointException carries each failing rank's exception and traceback."""
    if isinstance(err, CheckpointException):
        return "; ".join(f"rank {rank}: {describe(e[0] if isinstance(e, tuple) else e)}"
                         for rank, e in sorted(err.failures.items()))
    return describe(err)


def _hashed(path: Path, rank: int) -> FileEntry:
    return FileEntry(path.stat().st_size, sha256_of(LocalFileSystem(), str(path)), rank)


# ---------------------------------------------------------------------- loading

def load_shards(folder: str, template: dict[str, Any], reader: Optional[dcp.FileSystemReader] = None) -> None:
    """Fill `template` (this layout's sharded state: what the ranks would save now) from the shards
    in the local `folder` (or through `reader`), resharding as needed. A collective when a process group
    exists; a rank's failure to read raises CheckpointException on every rank."""
    with _one_process_is_meant():
        dcp.load(template, storage_reader=reader or dcp.FileSystemReader(folder))


class FetchingReader(dcp.FileSystemReader):
    """DCP's file reader over a node's copy of a remote checkpoint that holds only what was read so far: the
    files this rank's read plan needs are fetched first (spread.NodeCopy.fetch)."""

    def __init__(self, folder: str, fetch: Callable[[set[str]], None]) -> None:
        super().__init__(folder)
        self._fetch = fetch

    def read_data(self, plan: Any, planner: Any) -> Any:
        self._fetch({self.storage_data[item.storage_index].relative_path for item in plan.items})
        return super().read_data(plan, planner)


def only_corrupt_files(err: BaseException) -> bool:
    """Whether DCP's load failed only because files did not match their manifest (on any rank)."""
    if isinstance(err, CorruptCheckpoint):
        return True
    failures = getattr(err, "failures", None) if isinstance(err, CheckpointException) else None
    return bool(failures) and all(isinstance(e[0] if isinstance(e, tuple) else e, CorruptCheckpoint)
                                  for e in failures.values())



@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns when it loads without a process group; one rank (or export) is what we mean then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def shard_keys(folder: str) -> set[str]:
    """The top-level state keys the shards hold ("model", "optimizer")."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    return {path[0] for path in metadata.planner_data.values()}


def read_full(folder: str, keys: set[str]) -> dict[str, Any]:
    """The shards' `keys` as whole tensors on one process, without a model to give them a layout:
    a template is built from DCP's own index (what `launcher export` needs)."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    template: dict[str, Any] = {key: {} for key in keys}
    for fqn, path in metadata.planner_data.items():
        if path[0] not in keys:
            continue
        entry = metadata.state_dict_metadata[fqn]
        if isinstance(entry, TensorStorageMetadata):
            value: Any = torch.empty(entry.size, dtype=entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            value = None  # replaced by the saved object
        else:
            raise CheckpointError(f"{folder}: {fqn} is stored as {type(entry).__name__}, which cannot be read whole")
        _nest(template, path, value)
    with _one_process_is_meant():
        dcp.load(template, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return template


def _nest(tree: dict[str, Any], path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
