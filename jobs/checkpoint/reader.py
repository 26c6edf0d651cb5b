"""Reading a committed checkpoint, every file checked against its manifest entry once, as it is read.

A local file is hashed in one pass (through a small reused buffer; the read and hashlib release the
GIL), then torch.load reads it from the page cache that pass filled: the disk is read once. The
file's identity (device, inode, size, mtime) must be the same after the load as when it was hashed,
so a file replaced in between is not trusted. A remote file is downloaded once, hashed, and loaded
from memory.

Files are fetched and checked on HASH_THREADS threads, largest first, and loaded in the order their
check finishes, so the hashing of one file overlaps the loading of another.

torch.load(mmap=True) would skip the copy into fresh memory, but measured on the 133M-parameter
benchmark it only moves the cost: the optimizer's moments are written at the first step, page by
copy-on-write page, and until then the tensors pin the checkpoint file (its disk space stays in use
after retention deletes it, and on a shared file system a deleted file can fault).
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Collection, Optional, Union

import torch

from jobs.checkpoint.errors import CheckpointError, CorruptCheckpoint
from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest
from jobs.checkpoint.sharded import is_shard_file, read_full, shard_keys
from jobs.checkpoint.store import HASH_CHUNK, Store
from jobs.storage import filesystem, is_local, join
from jobs.schema import StorageConfig

HASH_THREADS = 2
Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
Fetched = Union[tuple[str, Identity], bytes]  # a checked local file (path, identity), or downloaded bytes


def load_checkpoint(location: str, storage: StorageConfig, map_location: str | torch.device = "cpu",
                    keys: Optional[Collection[str]] = None, hash_local: bool = True) -> dict[str, Any]:
    """name -> object from a committed checkpoint folder (local path or URI), every file checked
    against the manifest's size and SHA-256 and loaded with weights_only=True. Raises
    CorruptCheckpoint for a file that does not match.

    `hash_local=False` checks only the sizes of files on a local file system: for a rank whose
    node-mate (local rank 0) hashes the same files. Downloads are always hashed: each can differ.

    A sharded checkpoint (jobs.checkpoint.sharded) must be local; its shards are checked too, but
    loaded only when `keys` names what they hold ("model", "optimizer"), as whole tensors: a layout
    loads its own shards with sharded.load_shards() instead.
    """
    fs, root = filesystem(location, storage)
    store = Store(fs, root, location)
    try:
        manifest = Manifest.from_json(fs.cat_file(store.path(MANIFEST)))
    except FileNotFoundError:
        raise CheckpointError(f"{location} has no {MANIFEST}: it is not a committed checkpoint; "
                              f"use Checkpointer.latest() to find one") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{join(location, MANIFEST)} is unreadable: {err}") from None
    shards = {f: e for f, e in manifest.files.items() if is_shard_file(f)}
    if shards and not is_local(fs):
        raise CheckpointError(f"{location} is a sharded checkpoint on a remote store: download it first "
                              f"(Checkpointer.load_latest() does)")
    plain = {f: e for f, e in manifest.files.items() if f not in shards}
    wanted = {f: e for f, e in plain.items() if keys is None or f.removesuffix(".pt") in keys}
    from_shards = set(keys or ()) - {f.removesuffix(".pt") for f in wanted}
    if from_shards and (not shards or not from_shards <= shard_keys(store.path())):
        held = sorted(f.removesuffix(".pt") for f in plain) + (sorted(shard_keys(store.path())) if shards else [])
        raise CheckpointError(f"{location} holds {held}, not all of the requested {sorted(keys or ())}")
    loaded = _load_files(store, wanted, shards, map_location, hash_local)
    state = {f.removesuffix(".pt"): loaded[f] for f in wanted}
    if from_shards:
        state.update(read_full(store.path(), from_shards))
    return state


def _load_files(store: Store, files: dict[str, FileEntry], shards: dict[str, FileEntry],
                map_location: str | torch.device, hash_local: bool) -> dict[str, Any]:
    """`files` loaded; `shards` only checked (DCP reads them)."""
    if not files and not shards:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(files) + len(shards)), thread_name_prefix="ckpt-read")
    try:
        by_size = sorted({**files, **shards}.items(), key=lambda item: -item[1].size)
        futures: dict[Future, str] = {pool.submit(_fetch, store, f, e, hash_local): f for f, e in by_size}
        loaded = {}
        for done in as_completed(futures):
            fetched, name = done.result(), futures[done]  # a shard that does not match raises here too
            if name in files:
                loaded[name] = _torch_load(fetched, store.location(name), map_location)
        return loaded
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fetch(store: Store, file: str, entry: FileEntry, hash_local: bool) -> Fetched:
    """The file checked against `entry`: a local one in place (its hash only with `hash_local`),
    a remote one downloaded."""
    where, path = store.location(file), store.path(file)
    if not is_local(store.fs):
        data = store.fs.cat_file(path)
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise _corrupt(where)
        return data
    with open(path, "rb", buffering=0) as f:
        identity = _identity(os.fstat(f.fileno()))
        if identity[2] != entry.size or (hash_local and _sha256_of_open(f) != entry.sha256):
            raise _corrupt(where)
    return path, identity


def _sha256_of_open(f: io.RawIOBase) -> str:
    digest, buffer = hashlib.sha256(), bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def _torch_load(fetched: Fetched, where: str, map_location: str | torch.device) -> Any:
    try:
        if isinstance(fetched, bytes):
            return torch.load(io.BytesIO(fetched), map_location=map_location, weights_only=True)
        path, identity = fetched
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{where} cannot be loaded with weights_only=True (only tensors and plain "
                              f"Python values are accepted): {err}") from err
    if _identity(os.stat(path)) != identity:
        raise CorruptCheckpoint(f"{where} was replaced while it was read: not trusting what was loaded")
    return obj


def _identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _corrupt(where: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{where} does not match the size/SHA-256 in its manifest: the checkpoint is "
                             f"corrupt. Resume from an older one (load_latest() skips corrupt checkpoints)")
