"""Checkpoints that survive kills, full disks of patience and stores that go away.

Layout, locally and on the remote store alike:

    <dir>/step-000000123/model.pt, optimizer.pt, ...   one torch.save file per top-level state key
    <dir>/step-000000123/manifest.json                  step, metrics, created, every file's size and SHA-256
    <dir>/latest                                        text: the newest committed folder (a hint for humans)
    <remote>/run-owner.json                             the run id the remote folder belongs to
    <local_dir>/saves.jsonl                             one JSON line per save and per upload (timings, bytes)

Commit protocol: the files are written (and fsynced) first; `manifest.json` is written last, by an
atomic rename locally and, remotely, only after every file's upload was confirmed by its size. The
manifest is the commit marker: a folder without one, or whose files differ from it, does not exist
for `latest()`, which scans every `step-*` folder newest first instead of trusting the pointer.

Async saves copy the state into reusable host buffers (the only time training waits), then a writer
thread writes and commits the local copy (hashing as it writes, with the GIL released, so the
training thread is not stalled) and an uploader thread sends committed folders to the store. A
store that is down never blocks training: the local copy stays, its upload stays pending and is
retried on the next save and by `flush()`.

Faults cost a save, not the run: a write error (a full disk, a quota) removes the partial folder,
is logged as an ERROR and training goes on; the next save tries again. A remote folder belongs to
one run (its owner record, written before the first upload, and every manifest name the run id):
a Checkpointer of another run refuses it before reading, writing or pruning anything there.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from jobs.storage import (MANIFEST, OWNER_FILE, STEP_DIR, filesystem, folder_owner, foreign_folder_message,
                          fresh_listing, is_local, join)
from schema import CheckpointConfig, StorageConfig
from schema.secrets import redact_text

log = logging.getLogger("jobs.checkpoint")

POINTER = "latest"
SAVES_LOG = "saves.jsonl"
FORMAT = 1
STATE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 4.0
HASH_CHUNK = 8 << 20
# Leaves torch.load(weights_only=True) accepts; anything else is refused at save() time, when the
# user can still fix it, rather than at resume time.
PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
WRAPPER_NAMES = ("module", "_orig_mod")  # added by DistributedDataParallel and torch.compile
# `extra=` of per-save detail (saved, uploaded, pruned): the rank's log file keeps it, the console
# shows only what a person watching needs (see jobs.train.setup_logging).
FILE_ONLY = {"console": False}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names it and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A file of a committed checkpoint does not match its manifest's size or SHA-256."""


class ForeignRunFolder(CheckpointError):
    """The remote checkpoint folder belongs to another run: nothing is written or deleted there."""


class InvalidCheckpoint(Exception):
    """A step folder that is not a committed checkpoint; the message says why."""


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step {step} is negative; steps count optimizer steps from 0")
    return f"step-{step:09d}"


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    metrics: dict[str, float]
    created: float  # seconds since the epoch
    files: dict[str, FileEntry]  # file name -> size and hash
    run_id: Optional[str] = None  # the run that wrote it (None: written before manifests named their run)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "step": self.step, "metrics": self.metrics, "created": self.created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "files": {name: {"size": f.size, "sha256": f.sha256} for name, f in self.files.items()},
            **({"run_id": self.run_id} if self.run_id else {}),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Raises ValueError/KeyError/TypeError on anything malformed."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        files = {str(n): FileEntry(int(f["size"]), str(f["sha256"])) for n, f in data["files"].items()}
        metrics = {str(k): float(v) for k, v in data["metrics"].items()}
        if int(data["step"]) < 0:
            raise ValueError(f"negative step {data['step']}")
        run_id = data.get("run_id")
        return cls(int(data["step"]), metrics, float(data["created"]), files, str(run_id) if run_id else None)


# ----------------------------------------------------------------------------- one store's folder
@dataclass
class _Store:
    """The checkpoint folder of one run on one file system (the local disk or the remote store)."""
    fs: AbstractFileSystem
    root: str  # path inside fs
    uri: str  # as the user spelled it; locations handed out are built from it

    def path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def location(self, name: str) -> str:
        return join(self.uri, name)

    def step_dirs(self) -> dict[str, int]:
        """Folder name -> step, for every `step-*` folder, committed or not."""
        out = {}
        for entry in fresh_listing(self.fs, self.root):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            match = STEP_DIR.match(name)
            if match and entry["type"] == "directory":
                out[name] = int(match.group(1))
        return out

    def verify(self, name: str, full_hash: bool) -> Manifest:
        """The manifest of a committed checkpoint; raises InvalidCheckpoint saying what is wrong.

        Sizes are always checked (they catch truncation and half uploads); SHA-256 only with
        `full_hash`, since on a remote store that means downloading everything.
        """
        sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fresh_listing(self.fs, self.path(name))
                 if e["type"] == "file"}
        if MANIFEST not in sizes:
            raise InvalidCheckpoint("no manifest.json: the save was interrupted, or is still being written")
        try:
            manifest = Manifest.from_json(self.fs.cat_file(self.path(name, MANIFEST)))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InvalidCheckpoint(f"manifest.json is unreadable ({type(err).__name__}: {err})") from None
        if step_dir_name(manifest.step) != name:
            raise InvalidCheckpoint(f"manifest.json is for step {manifest.step}, not this folder")
        for file, entry in manifest.files.items():
            if file not in sizes:
                raise InvalidCheckpoint(f"{file} is missing")
            if sizes[file] != entry.size:
                raise InvalidCheckpoint(f"{file} has {sizes[file]} bytes but the manifest says {entry.size} "
                                        f"(truncated?)")
            if full_hash and _sha256_of(self.fs, self.path(name, file)) != entry.sha256:
                raise InvalidCheckpoint(f"{file} does not match its SHA-256 in the manifest (corrupted)")
        return manifest

    def committed(self) -> tuple[dict[str, int], dict[str, Manifest]]:
        """(all step folders, the size-valid committed ones with their manifests)."""
        dirs = self.step_dirs()
        manifests = {}
        for name in dirs:
            try:
                manifests[name] = self.verify(name, full_hash=False)
            except (InvalidCheckpoint, FileNotFoundError):
                pass
        return dirs, manifests

    def remove(self, name: str) -> None:
        """Uncommit first (manifest), so a reader never sees a committed folder with files missing."""
        try:
            self.fs.rm_file(self.path(name, MANIFEST))
        except FileNotFoundError:
            pass
        self.fs.rm(self.path(name), recursive=True)
        self.fs.invalidate_cache(self.root)


def _sha256_of(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- state snapshots
def _copy_tree(obj: Any, where: str, copy_tensor: Callable[[Tensor, str], Tensor]) -> Any:
    """Rebuild the containers of `obj` (training keeps mutating the originals) with `copy_tensor`
    applied to every tensor; refuse anything torch.load(weights_only=True) would refuse."""
    if isinstance(obj, Tensor):
        return copy_tensor(obj, where)
    if isinstance(obj, PLAIN_LEAVES) or isinstance(obj, torch.Size):
        return obj  # immutable
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((k, _copy_tree(v, f"{where}.{k}", copy_tensor)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() versions, read by load_state_dict
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, set):
        return type(obj)(_copy_tree(v, f"{where}[{i}]", copy_tensor) for i, v in enumerate(obj))
    raise TypeError(f"checkpoint state {where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    f"saved; only tensors, numbers, strings, None and dict/list/tuple/set of them load with "
                    f"weights_only=True. Convert it (e.g. .item(), torch.from_numpy(), a state_dict() of "
                    f"plain values)")


class _HostBuffers:
    """Host tensors a snapshot is copied into, kept across saves: allocating 400 MB afresh costs
    page faults that take ~25x longer than the copy itself."""

    def __init__(self) -> None:
        self.by_path: dict[str, Tensor] = {}

    def snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        seen: dict[tuple, Tensor] = {}  # tensors sharing memory (tied weights) stay shared
        devices: set[torch.device] = set()

        def copy(t: Tensor, where: str) -> Tensor:
            if t.layout != torch.strided:
                return t.detach().to("cpu", copy=True)
            identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                        t.dtype)
            if identity in seen:
                return seen[identity]
            buf = self.by_path.get(where)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != t.is_cuda:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self.by_path[where] = buf
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            seen[identity] = buf
            return buf

        with torch.no_grad():
            snap = {key: _copy_tree(value, key, copy) for key, value in state.items()}
        used = {id(t) for t in seen.values()}
        self.by_path = {p: b for p, b in self.by_path.items() if id(b) in used}  # state that went away
        for device in devices:  # the non_blocking copies must land before save() returns
            torch.cuda.synchronize(device)
        return snap


def _check_state(state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
    if not isinstance(state, dict) or not state:
        raise TypeError(f"checkpoint state must be a non-empty dict of name -> object, got {state!r:.80}")
    for key in state:
        if not isinstance(key, str) or not STATE_KEY.match(key) or key == "manifest":
            raise ValueError(f"checkpoint state key {key!r} cannot be a file name: use letters, digits, _ . - "
                             f"(and not 'manifest')")
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metrics must be numbers, got {metrics!r:.200}: {err}") from None


# ----------------------------------------------------------------------------- retention
def retained(manifests: dict[str, Manifest], cfg: CheckpointConfig) -> set[str]:
    """The newest `keep_last` committed checkpoints plus the best one by `best_metric`."""
    newest = sorted(manifests, key=lambda n: manifests[n].step, reverse=True)
    keep = set(newest[:cfg.keep_last])
    if cfg.best_metric:
        sign = 1.0 if cfg.best_mode == "max" else -1.0
        scored = [(sign * m.metrics[cfg.best_metric], m.step, n) for n, m in manifests.items()
                  if not math.isnan(m.metrics.get(cfg.best_metric, math.nan))]
        if scored:
            keep.add(max(scored)[2])  # ties: the newer one
    return keep


def _prune(store: _Store, cfg: CheckpointConfig, protected: Callable[[set[str]], set[str]]) -> None:
    """Delete committed checkpoints outside `retained()` and uncommitted folders older than the
    newest committed one (newer ones may still be in progress). `protected(keep)` names folders
    that must stay anyway (being uploaded, waiting for upload)."""
    dirs, manifests = store.committed()
    if not manifests:
        return  # never delete the only candidates for resume
    keep = retained(manifests, cfg)
    keep |= protected(keep)
    newest = max(m.step for m in manifests.values())
    for name, step in sorted(dirs.items(), key=lambda item: item[1]):
        if name in keep or (name not in manifests and step >= newest):
            continue
        what = "committed" if name in manifests else "uncommitted leftover"
        log.info("deleting %s checkpoint %s (retention: keep_last=%d, best_metric=%s)",
                 what, store.location(name), cfg.keep_last, cfg.best_metric, extra=FILE_ONLY)
        store.remove(name)


# ----------------------------------------------------------------------------- loading
def load_checkpoint(location: str, storage: StorageConfig, map_location: str | torch.device = "cpu",
                    keys: Optional[Collection[str]] = None) -> dict[str, Any]:
    """name -> object from a committed checkpoint folder (local path or URI), every file checked
    against the manifest's SHA-256 and loaded with weights_only=True."""
    fs, root = filesystem(location, storage)
    store = _Store(fs, root, location)
    try:
        manifest = Manifest.from_json(fs.cat_file(store.path(MANIFEST)))
    except FileNotFoundError:
        raise CheckpointError(f"{location} has no {MANIFEST}: it is not a committed checkpoint; "
                              f"use Checkpointer.latest() to find one") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{join(location, MANIFEST)} is unreadable: {err}") from None
    wanted = [f for f in manifest.files if keys is None or f.removesuffix(".pt") in keys]
    if keys is not None and len(wanted) != len(set(keys)):
        raise CheckpointError(f"{location} holds {sorted(f.removesuffix('.pt') for f in manifest.files)}, "
                              f"not all of the requested {sorted(keys)}")
    return {f.removesuffix(".pt"): _load_file(store, f, manifest.files[f], map_location) for f in wanted}


def _load_file(store: _Store, file: str, entry: FileEntry, map_location: str | torch.device) -> Any:
    where = store.location(file)
    data = store.fs.cat_file(store.path(file))
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptCheckpoint(f"{where} does not match the size/SHA-256 in its manifest: the checkpoint is "
                              f"corrupt. Resume from an older one (latest() skips corrupt checkpoints)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{where} cannot be loaded with weights_only=True (only tensors and plain "
                              f"Python values are accepted): {err}") from err


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model state dict without the wrapper prefixes DDP (`module.`) and torch.compile
    (`_orig_mod.`) add, so it loads into the bare model. The one place this is done.

    Leading wrapper names are stripped in any nesting (`_orig_mod.module.x` -> `x`); `_orig_mod`
    is also removed inside keys (a compiled submodule). An inner `module` is kept: it can be a
    real submodule's name.
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = _strip_name(key)
        if new in out:
            raise ValueError(f"strip_prefixes: keys {origin[new]!r} and {key!r} both become {new!r}; "
                             f"the state dict mixes wrapped and unwrapped copies of the model")
        out[new], origin[new] = value, key
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions keyed by module path, e.g. "module.features.0"
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            sorted(((_strip_name(k), v) for k, v in metadata.items()), key=lambda kv: kv[0].count(".")))
    return out


def _strip_name(name: str) -> str:
    parts = name.split(".")
    while parts and parts[0] in WRAPPER_NAMES:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def export_model(location: str, out_path: str, storage: StorageConfig, key: str = "model") -> str:
    """Write `state[key]` of a checkpoint as a plain model state dict (prefixes stripped) for
    inference: `model.load_state_dict(torch.load(out_path, weights_only=True))`. Returns out_path."""
    state = strip_prefixes(load_checkpoint(location, storage, keys=[key])[key])
    fs, path = filesystem(out_path, storage)
    if is_local(fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fs.pipe_file(path, buffer.getvalue())
    log.info("exported %s of %s to %s", key, location, out_path)
    return out_path


# ----------------------------------------------------------------------------- local writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself must survive a power cut


class _HashingWriter:
    """The file object torch.save writes through: hashes what it writes (no second read) and
    writes with the GIL released. torch.save(obj, path) writes each tensor holding the GIL, which
    stalls the training thread for ~0.1 s per 100 MB; here it gets memoryviews and hands them to
    hashlib and an unbuffered file, both of which release the GIL."""

    def __init__(self, f: io.RawIOBase) -> None:
        self.f, self.digest, self.size = f, hashlib.sha256(), 0
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
        return written

    def flush(self) -> None:
        pass  # unbuffered: nothing held back


def _save_hashed(obj: Any, path: Path) -> FileEntry:
    with open(path, "wb", buffering=0) as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        os.fsync(f.fileno())
    return FileEntry(writer.size, writer.digest.hexdigest())


@dataclass
class _Job:
    step: int
    state: dict[str, Any]
    metrics: dict[str, float]
    started: float  # perf_counter at save() entry
    buffers: Optional[_HostBuffers] = None
    blocked_s: float = 0.0


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves, finds and loads checkpoints of one run; see the module docstring for the protocol.

    Only the writer (rank 0) writes: on other ranks save() does nothing and flush() returns True,
    so the trainer can call them on every rank. Every rank may call latest() and load().

    With a `run_id`, the remote folder belongs to that run: its owner record (`run-owner.json`) is
    written before the first upload, and a folder owned by another run is neither read, written
    nor pruned (ForeignRunFolder).
    """

    def __init__(self, cfg: CheckpointConfig, local_dir: Path, remote: str | None,
                 storage: StorageConfig, is_writer: bool = True, run_id: Optional[str] = None) -> None:
        self.cfg, self.storage, self.is_writer, self.run_id = cfg, storage, is_writer, run_id
        self.local_dir = Path(local_dir).absolute()
        self.remote_uri = remote.rstrip("/") if remote else None
        self._local = _Store(LocalFileSystem(), str(self.local_dir), str(self.local_dir))
        self._remote: Optional[_Store] = None
        if remote:
            fs, root = filesystem(remote, storage)
            self._remote = _Store(fs, root, self.remote_uri or remote)
        self._lock = threading.Condition()  # guards everything below that both threads touch
        self._pending: set[str] = set()  # committed locally, not yet on the remote store
        self._uploading: Optional[str] = None
        self._in_flight = 0  # saves accepted but not yet committed locally
        self._rounds_requested = self._rounds_done = 0
        self._upload_deadline: Optional[float] = None
        self._pointer_step = -1
        self._error: Optional[BaseException] = None
        self._submitted: set[int] = set()
        self._saves_committed = self._saves_failed = 0
        self._corrupt_remote: set[str] = set()  # found corrupt at load: uploaded again even if the manifest matches
        self._stop = threading.Event()
        self._jsonl_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        if is_writer:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            self._claim_remote_folder()
            self._pending = self._not_yet_uploaded()
            if cfg.async_save:
                self._start_threads()

    # ------------------------------------------------------------------ public API
    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Checkpoint `state` (name -> object, one file each) at `step`. Async: returns once the
        tensors are copied to host memory; blocks while `queue_size` saves are already waiting."""
        if not self.is_writer:
            return
        if self._closed:
            raise CheckpointError(f"save(step={step}) after close(): create a new Checkpointer for {self.local_dir}")
        self._raise_background_error()
        started = time.perf_counter()
        metrics = _check_state(state, metrics)
        name = step_dir_name(step)
        if step in self._submitted:
            log.info("checkpoint %s was already saved by this run; not saving it again", name)
            return
        if not self.cfg.async_save:
            for key, value in state.items():  # the same refusals as the async path's snapshot
                _copy_tree(value, key, lambda t, where: t)
            self._save_now(_Job(step, state, metrics, started))
        else:
            self._enqueue(step, state, metrics, started)
        self._submitted.add(step)

    def latest(self) -> str | None:
        """Location (local path or remote URI) of the newest committed, intact checkpoint, or None.

        Scans every `step-*` folder of both stores, newest first (the local copy first on a tie:
        it is faster), and skips invalid ones with a warning. Local copies are checked against
        their SHA-256; remote ones by size (load() checks the hashes as it downloads).
        """
        return self._latest(skip=set())

    def load_latest(self, map_location: str | torch.device = "cpu") -> Optional[tuple[str, dict[str, Any]]]:
        """(location, state) of the newest checkpoint that loads, or None. A remote checkpoint whose
        files do not match their SHA-256 as they download is skipped for the next older one."""
        skipped: set[str] = set()
        while (found := self._latest(skipped)) is not None:
            try:
                return found, self.load(found, map_location)
            except CorruptCheckpoint as err:
                log.warning("skipping checkpoint %s: %s", found, err)
                skipped.add(found)
                self._corrupt_remote.add(found.rsplit("/", 1)[-1])
        return None

    def _latest(self, skip: set[str]) -> str | None:
        candidates = [(step, 0, self._local, name) for name, step in self._local.step_dirs().items()]
        remote_error = None
        if self._remote is not None:
            try:
                candidates += [(s, 1, self._remote, n) for n, s in self._list_remote_with_retries().items()]
            except ForeignRunFolder:
                raise
            except Exception as err:
                remote_error = err
        candidates = [c for c in candidates if c[2].location(c[3]) not in skip]
        found = self._first_valid(sorted(candidates, key=lambda c: (-c[0], c[1])))
        if remote_error is not None:
            self._report_unreachable(remote_error, found)
        return found

    def load(self, location: str, map_location: str | torch.device = "cpu",
             keys: Optional[Collection[str]] = None) -> dict[str, Any]:
        """name -> object of the checkpoint at `location` (from latest()); `keys` limits the files read."""
        return load_checkpoint(location, self.storage, map_location, keys)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` s (default checkpoint.flush_timeout_s) for queued saves and pending
        uploads. True when everything is committed locally and, with a remote, remotely, and
        not every save of this run failed to write."""
        if not self.is_writer:
            return True
        deadline = time.monotonic() + (self.cfg.flush_timeout_s if timeout is None else timeout)
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, deadline - time.monotonic()))
        self._upload_deadline = deadline
        try:
            while self._pending and time.monotonic() < deadline:
                if not self._run_upload_round(deadline):
                    self._stop.wait(min(BACKOFF_FIRST_S, max(0.0, deadline - time.monotonic())))
        finally:
            self._upload_deadline = None
        self._raise_background_error()
        with self._lock:
            nothing_saved = self._saves_failed > 0 and self._saves_committed == 0
            return self._in_flight == 0 and not self._pending and not nothing_saved

    def close(self) -> None:
        """Finish queued local saves and stop the background threads. Does not wait for uploads:
        call flush() first; what is still pending is uploaded by the next Checkpointer on this
        local_dir."""
        self._closed = True
        if self._threads:
            self._jobs.put(None)
            self._threads[0].join()
            with self._lock:
                self._stop.set()
                self._lock.notify_all()
            self._threads[1].join(timeout=10)
            self._threads = []
        if self._pending:
            log.warning("checkpoints %s were not uploaded to %s; they stay in %s and are uploaded by the "
                        "next run using that folder", sorted(self._pending), self.remote_uri, self.local_dir)
        self._raise_background_error()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ saving
    def _start_threads(self) -> None:
        # LIFO: the set released last is taken first, so a lone save always reuses warm buffers.
        self._free_buffers: queue.LifoQueue[_HostBuffers] = queue.LifoQueue()
        for _ in range(self.cfg.queue_size + 1):  # queue_size waiting + the one being written
            self._free_buffers.put(_HostBuffers())
        self._jobs: queue.Queue[Optional[_Job]] = queue.Queue()
        self._threads = [threading.Thread(target=self._writer_loop, name="ckpt-writer", daemon=True),
                         threading.Thread(target=self._uploader_loop, name="ckpt-uploader", daemon=True)]
        for thread in self._threads:
            thread.start()
        if self._pending:
            self._request_upload_round()

    def _enqueue(self, step: int, state: dict[str, Any], metrics: dict[str, float], started: float) -> None:
        buffers = self._free_buffers.get()  # blocks while queue_size saves are waiting: bounds host memory
        try:
            snapshot = buffers.snapshot(state)
        except BaseException:
            self._free_buffers.put(buffers)
            raise
        job = _Job(step, snapshot, metrics, started, buffers)
        with self._lock:
            self._in_flight += 1
        job.blocked_s = time.perf_counter() - started
        self._jobs.put(job)
        log.info("checkpoint step %d: training blocked %.3f s for the host copy", step, job.blocked_s,
                 extra=FILE_ONLY)

    def _save_now(self, job: _Job) -> None:
        """Synchronous save: commit locally, upload (with retries) and prune, all before returning."""
        manifest = self._commit_local(job)
        job.blocked_s = time.perf_counter() - job.started
        if manifest is not None:
            self._after_local_commit(job, manifest)
            self._upload_round(None)

    def _writer_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                manifest = self._commit_local(job)
                if manifest is not None:
                    self._after_local_commit(job, manifest)
            except BaseException as err:
                log.exception("background checkpoint save of step %d failed", job.step)
                self._error = self._error or CheckpointError(f"background save of step {job.step} to "
                                                             f"{self.local_dir} failed: {err}")
            finally:
                if job.buffers is not None:
                    self._free_buffers.put(job.buffers)
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()
            if self._remote is not None:
                self._request_upload_round()

    def _commit_local(self, job: _Job) -> Optional[Manifest]:
        """Write the files, then the manifest (the commit), then the pointer. None if already there
        or if the disk refused the write."""
        folder = self.local_dir / step_dir_name(job.step)
        if self._intact(folder.name):
            log.warning("%s is already committed (by an earlier run?); keeping it, not saving step %d again",
                        folder, job.step)
            self._count_save(committed=True)
            return None
        try:
            manifest = self._write_folder(folder, job)
        except OSError as err:
            self._discard_failed_save(folder, job.step, err)
            return None
        self._count_save(committed=True)
        try:
            _write_atomic(self.local_dir / POINTER, folder.name + "\n")
        except OSError as err:  # the checkpoint is committed: the pointer is only a hint for humans
            log.warning("could not update %s (%s)", self.local_dir / POINTER, _describe(err))
        return manifest

    def _write_folder(self, folder: Path, job: _Job) -> Manifest:
        if folder.exists():
            (folder / MANIFEST).unlink(missing_ok=True)  # uncommit first: a crash below leaves no half-valid folder
            shutil.rmtree(folder)  # an interrupted or corrupt save of this step
        folder.mkdir(parents=True)
        files = {f"{key}.pt": _save_hashed(obj, folder / f"{key}.pt") for key, obj in job.state.items()}
        if job.buffers is not None:  # the snapshot is on disk: let the next save() reuse its memory
            self._free_buffers.put(job.buffers)
            job.buffers = None
        manifest = Manifest(job.step, job.metrics, time.time(), files, self.run_id)
        _fsync(folder)
        _write_atomic(folder / MANIFEST, manifest.to_json())
        return manifest

    def _discard_failed_save(self, folder: Path, step: int, err: OSError) -> None:
        """A full disk (or a quota, or a file size limit) costs this save, not the run: the partial
        folder goes, training continues, and the next save tries again."""
        shutil.rmtree(folder, ignore_errors=True)
        self._count_save(committed=False)
        log.error("checkpoint step %d NOT saved: writing %s failed (%s). Removed the partial folder; training "
                  "continues and the next save tries again. Free space in %s", step, folder, _describe(err),
                  self.local_dir)

    def _count_save(self, committed: bool) -> None:
        with self._lock:
            if committed:
                self._saves_committed += 1
            else:
                self._saves_failed += 1

    def _intact(self, name: str) -> bool:
        try:
            self._local.verify(name, full_hash=True)
            return True
        except (InvalidCheckpoint, FileNotFoundError):
            return False

    def _after_local_commit(self, job: _Job, manifest: Manifest) -> None:
        commit_s = time.perf_counter() - job.started
        log.info("checkpoint step %d committed to %s in %.3f s (%.1f MB; training blocked %.3f s)",
                 job.step, self.local_dir, commit_s, manifest.total_bytes / 1e6, job.blocked_s, extra=FILE_ONLY)
        self._append_jsonl({"event": "save", "step": job.step, "blocked_s": round(job.blocked_s, 4),
                            "commit_s": round(commit_s, 4), "bytes": manifest.total_bytes,
                            "async": self.cfg.async_save, "time": manifest.created})
        if self._remote is not None:
            with self._lock:
                self._pending.add(step_dir_name(job.step))
        _prune(self._local, self.cfg, self._protected_locally)

    def _protected_locally(self, keep: set[str]) -> set[str]:
        """Pending uploads the retention keeps stay; the rest will never be needed remotely either
        (they are older than `keep_last` newer ones), so they are dropped to bound the disk."""
        with self._lock:
            dropped = self._pending - keep - {self._uploading}
            if dropped:
                log.info("not uploading %s any more: newer checkpoints replace them", sorted(dropped),
                         extra=FILE_ONLY)
            self._pending -= dropped
            return {self._uploading} if self._uploading else set()

    def _append_jsonl(self, record: dict[str, Any]) -> None:
        try:
            with self._jsonl_lock, open(self.local_dir / SAVES_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # timings only: a full disk must not cost the checkpoint itself
            log.warning("could not append to %s (%s)", self.local_dir / SAVES_LOG, _describe(err))

    def _not_yet_uploaded(self) -> set[str]:
        """At start, every retained local checkpoint may be missing remotely (a crash before its
        upload); the uploader checks each remote manifest before sending anything."""
        if self._remote is None:
            return set()
        _, manifests = self._local.committed()
        return retained(manifests, self.cfg) if manifests else set()

    def _raise_background_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    # ------------------------------------------------------------------ uploading
    def _uploader_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stop.is_set() or self._rounds_requested > self._rounds_done)
                if self._stop.is_set():
                    return
                ticket, deadline = self._rounds_requested, self._upload_deadline
            try:
                self._upload_round(deadline)
            except ForeignRunFolder as err:  # raised to the training loop by the next save() or flush()
                log.error("%s", err)
                self._error = self._error or err
            except Exception:
                log.exception("checkpoint upload round failed unexpectedly; uploads stay pending")
            with self._lock:
                self._rounds_done = ticket
                self._lock.notify_all()

    def _request_upload_round(self) -> int:
        with self._lock:
            self._rounds_requested += 1
            self._lock.notify_all()
            return self._rounds_requested

    def _run_upload_round(self, deadline: float) -> bool:
        """One round on the uploader thread (or here, for synchronous saves); True if nothing is pending after it."""
        if not self._threads:
            return self._upload_round(deadline)
        ticket = self._request_upload_round()
        with self._lock:
            self._lock.wait_for(lambda: self._rounds_done >= ticket, timeout=max(0.0, deadline - time.monotonic()))
            return not self._pending

    def _upload_round(self, deadline: Optional[float]) -> bool:
        """Upload pending checkpoints oldest first, then prune the remote. Stops at the first one
        that fails: the store is probably down, and the rest would wait out the same backoff."""
        assert self._remote is not None or not self._pending
        with self._lock:
            todo = sorted(self._pending)
        # Checked before every round: another run may have claimed the folder since the last one.
        if todo and self._with_backoff("owner check", lambda: self._check_owner(claim=True), deadline) is not None:
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
        if todo and self._remote is not None:
            remote = self._remote  # every pending checkpoint is up: nothing half-uploaded to protect
            self._with_backoff("pruning", lambda: _prune(remote, self.cfg, lambda keep: set()), deadline)
        return True

    def _upload_checkpoint(self, name: str, deadline: Optional[float]) -> bool:
        """Files first, each confirmed by its size on the store; the manifest only after all."""
        remote = self._remote
        assert remote is not None
        try:
            manifest = self._local.verify(name, full_hash=False)
        except (InvalidCheckpoint, FileNotFoundError) as err:
            log.warning("cannot upload %s: its local copy is gone or invalid (%s)", self.local_dir / name, err)
            return True  # nothing left to upload; do not block the others
        started = time.perf_counter()
        there = self._remote_manifest(name)
        if there is not None and there.files == manifest.files and name not in self._corrupt_remote:
            return True  # uploaded before a restart
        if there is not None:  # another save of this step: uncommit it before replacing its files
            uncommit = lambda: remote.fs.rm_file(remote.path(name, MANIFEST))  # noqa: E731
            if not self._retry_upload(f"removal of the old {name}/{MANIFEST}", uncommit, deadline):
                return False
        for file, entry in manifest.files.items():
            send = lambda f=file, e=entry: self._put_confirmed(name, f, e.size)  # noqa: E731
            if not self._retry_upload(f"upload of {name}/{file}", send, deadline):
                return False
        commit = lambda: self._put_text(name, MANIFEST, manifest.to_json())  # noqa: E731
        if not self._retry_upload(f"upload of {name}/{MANIFEST}", commit, deadline):
            return False
        self._after_upload(name, manifest, time.perf_counter() - started)
        return True

    def _remote_manifest(self, name: str) -> Optional[Manifest]:
        remote = self._remote
        assert remote is not None
        try:
            return Manifest.from_json(remote.fs.cat_file(remote.path(name, MANIFEST)))
        except Exception:
            return None  # absent, unreadable or unreachable: upload it (with retries)

    def _put_confirmed(self, name: str, file: str, size: int) -> None:
        remote = self._remote
        assert remote is not None
        target = remote.path(name, file)
        if is_local(remote.fs):
            remote.fs.makedirs(remote.path(name), exist_ok=True)
        remote.fs.put_file(str(self.local_dir / name / file), target)
        remote.fs.invalidate_cache(target)
        landed = remote.fs.info(target)["size"]
        if landed != size:
            raise OSError(f"{remote.location(name)}/{file} has {landed} bytes after upload, expected {size}")

    def _put_text(self, name: str, file: str, text: str) -> None:
        """A single PUT is atomic on object stores; a local-disk remote needs the rename."""
        remote = self._remote
        assert remote is not None
        target = remote.path(name, file) if name else remote.path(file)
        if is_local(remote.fs):
            remote.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            remote.fs.pipe_file(target + ".tmp", text.encode())
            remote.fs.mv(target + ".tmp", target)
        else:
            remote.fs.pipe_file(target, text.encode())

    def _after_upload(self, name: str, manifest: Manifest, upload_s: float) -> None:
        assert self._remote is not None
        log.info("checkpoint step %d committed to %s in %.3f s (%.1f MB)", manifest.step,
                 self._remote.location(name), upload_s, manifest.total_bytes / 1e6, extra=FILE_ONLY)
        self._corrupt_remote.discard(name)
        self._append_jsonl({"event": "upload", "step": manifest.step, "upload_s": round(upload_s, 4),
                            "bytes": manifest.total_bytes, "time": time.time()})
        if manifest.step > self._pointer_step:  # a pointer is only a hint, but never move it backwards
            self._pointer_step = manifest.step
            self._with_backoff("pointer update", lambda: self._put_text("", POINTER, name + "\n"), None)

    def _with_backoff(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> Optional[Exception]:
        """Run `action` up to `upload_retries` times with exponential backoff (capped, and cut
        short by `deadline` or close()); None once it worked, else the last error."""
        attempts = self.cfg.upload_retries
        for attempt in range(1, attempts + 1):
            try:
                action()
                return None
            except ForeignRunFolder:
                raise  # not a store failure: retrying does not change who owns the folder
            except Exception as err:
                delay = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_CAP_S)
                last = attempt == attempts or (deadline is not None and time.monotonic() + delay > deadline)
                log.log(logging.WARNING if last else logging.INFO, "%s at %s failed (attempt %d/%d): %s",
                        what, self.remote_uri, attempt, attempts, _describe(err))
                if last or self._stop.wait(delay):
                    return err
        raise AssertionError("unreachable: upload_retries >= 1 is checked by the config")

    def _retry_upload(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> bool:
        if self._with_backoff(what, action, deadline) is None:
            return True
        log.warning("%s left pending: retried at the next save and by flush()", what)
        return False

    # ------------------------------------------------------------------ finding
    def _list_remote_with_retries(self) -> dict[str, int]:
        remote = self._remote
        assert remote is not None
        found: dict[str, int] = {}

        def listing() -> None:
            self._check_owner(claim=False)  # another run's checkpoints are not this run's to resume from
            found.update(remote.step_dirs())

        error = self._with_backoff("listing", listing, None)
        if error is not None:
            raise error
        return found

    # ------------------------------------------------------------------ owning the remote folder
    def _claim_remote_folder(self) -> None:
        """At start: refuse a folder owned by another run before anything is read or written.
        A store that cannot be reached now is checked again before the first upload."""
        try:
            self._check_owner(claim=True)
        except ForeignRunFolder:
            raise
        except Exception as err:
            log.warning("cannot check which run owns %s now (%s); checked again before the first upload",
                        redact_text(str(self.remote_uri)), _describe(err))

    def _check_owner(self, claim: bool) -> None:
        """Raise ForeignRunFolder if the remote folder belongs to another run. With `claim`, a
        folder no run owns yet gets this run's owner record."""
        remote = self._remote
        if remote is None or self.run_id is None:
            return
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

    def _first_valid(self, candidates: list[tuple[int, int, _Store, str]]) -> str | None:
        for _, _, store, name in candidates:
            try:
                store.verify(name, full_hash=store is self._local)
                return store.location(name)
            except InvalidCheckpoint as err:
                log.warning("skipping checkpoint %s: %s", store.location(name), err)
            except Exception as err:  # a store failing mid-scan, a folder deleted by retention meanwhile
                log.warning("skipping checkpoint %s: cannot read it (%s)", store.location(name), _describe(err))
        return None

    def _report_unreachable(self, err: BaseException, found: str | None) -> None:
        """Resuming from nothing while the store may hold newer checkpoints would silently restart
        training: that is an error. A local checkpoint is used, with a warning."""
        if found is None:
            raise CheckpointError(f"cannot list checkpoints at {self.remote_uri} ({_describe(err)}) and there is no "
                                  f"local one in {self.local_dir}: starting from scratch could discard the run. "
                                  f"Check storage.endpoint_url and the credentials, or wait for the store")
        log.warning("cannot list checkpoints at %s (%s); resuming from the local %s, which may be older",
                    self.remote_uri, _describe(err), found)


def _describe(err: BaseException) -> str:
    """An error for the log, with any user:password@ in URLs masked."""
    return redact_text(f"{type(err).__name__}: {err}")
