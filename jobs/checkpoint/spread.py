"""Sharded checkpoints of nodes that share no folder (VMs): every rank sends its own shard to the
store, rank 0 commits the remote folder, and no node ever needs a whole checkpoint on its disk.

A save (sharded.py writes the shards; the Uploader sends them):
1. rank 0 uncommits the remote step folder (an earlier save of the same step) before DCP's first
   collective lets any rank write;
2. each rank writes its DCP files into its node's folder, hashes them, and sends them to the store
   itself, each confirmed by its size there (S3 checks each part's CRC32 on the way; every reader
   checks the SHA-256); a rank that cannot send them reports None instead of its files;
3. rank 0 gathers every rank's files; only if all were sent does it write its own small files and
   hand the manifest to its uploader, whose round sends those files, checks each rank's files are on
   the store with their sizes, and writes the manifest last: the remote commit.
A rank killed anywhere before 3 leaves a remote folder without a manifest, never resumed from.
Nothing is committed locally (a node's folder holds its ranks' shards only); each node keeps its
newest `keep_last` step folders, so a restart on the same VMs downloads only what it lacks.

A resume (Checkpointer.resume_spread): rank 0 picks the newest committed remote checkpoint and tells the
others; each node copies the small files and DCP's index into its folder, then each shard file only
when DCP's read plan for the node's ranks asks for it (NodeCopy: a same-size FSDP resume reads one shard
per rank, a resharding one what it needs), one rank of the node at a time under a lock, a file already
there with the manifest's SHA-256 (the node's own shard, on a restart on the same VMs) kept. A file that
does not match its manifest fails the load on every rank (DCP gathers each rank's failure), and every
rank moves on to the next older checkpoint, with a warning naming the file. A replacement VM with an
empty disk resumes the same way.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import threading
from pathlib import Path
from typing import Iterable, Optional, Protocol

from jobs.checkpoint.errors import FILE_ONLY, log
from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest, parse_step_dir
from jobs.checkpoint.disk import write_atomic
from jobs.checkpoint.store import Store, download_file, download_folder, matches
from jobs.checkpoint.stream import FileProgress, GrowingFile

FETCH_LOCK = ".fetching"  # in the step folder: the node's ranks copy a checkpoint once
CHECKED = ".checked.json"  # in a node's copy: file -> the SHA-256 it was checked against


class Streams(Protocol):
    def stream_own_file(self, name: str, file: str, progress: FileProgress) -> bool: ...


class OwnShard:
    """This rank's DCP file (`__<rank>_0.distcp`: one file per rank) sent to the store while DCP writes it, so
    that the upload overlaps the write instead of following it: what a spot notice's seconds need."""

    def __init__(self, uploads: Streams, folder: Path, rank: int) -> None:
        self.file = f"__{rank}_0.distcp"
        self.name = folder.name
        self._growing = GrowingFile(folder / self.file, rank)
        self._sent = False
        self._thread = threading.Thread(target=self._send, args=(uploads,), name="ckpt-own-shard", daemon=True)

    def start(self) -> None:
        self._growing.start()
        self._thread.start()

    def finish(self, written: bool) -> tuple[Optional[FileEntry], bool]:
        """DCP is done (`written`: it succeeded): the file's entry (hashed as it was written) and whether it
        is on the store."""
        entry = self._growing.finish(written)
        self._thread.join()
        return entry, self._sent and entry is not None

    def _send(self, uploads: Streams) -> None:
        self._sent = uploads.stream_own_file(self.name, self.file, self._growing.progress)


def prune_node_folder(folder: Path, keep: int, protected: set[str]) -> None:
    """This node's step folders beyond the newest `keep` removed, except `protected` ones (rank 0's
    saves whose remote commit is still pending). Several ranks of a node may prune at once."""
    steps = sorted(((step, path) for path in folder.glob("step-*")
                    if path.is_dir() and (step := parse_step_dir(path.name)) is not None), reverse=True)
    for _, path in steps[max(keep, 1):]:
        if path.name not in protected:
            log.info("removing this node's copy %s (kept on the store)", path, extra=FILE_ONLY)
            shutil.rmtree(path, ignore_errors=True)


def fetch_once(remote: Store, name: str, manifest: Manifest, folder: Path) -> None:
    """Checkpoint `name` of `remote` copied into this node's `folder` and committed there, by whichever
    of the node's ranks comes first; the others find it committed. Raises CorruptCheckpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / FETCH_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _committed_here(folder) != manifest.files:
            log.info("copying %s into %s (%.1f MB)", remote.location(name), folder, manifest.total_bytes / 1e6)
            download_folder(remote, name, manifest, folder)


def _committed_here(folder: Path) -> object:
    try:
        return Manifest.from_json((folder / MANIFEST).read_text()).files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class NodeCopy:
    """A remote sharded checkpoint as this node reads it: the files fetch() is asked for, each copied (or found
    already there) and checked against the manifest once per node, under the node's lock."""

    def __init__(self, remote: Store, name: str, manifest: Manifest, folder: Path) -> None:
        self.remote, self.name, self.manifest, self.folder = remote, name, manifest, folder

    def fetch(self, files: Iterable[str]) -> None:
        """`files` of the checkpoint in this node's folder, checked; CorruptCheckpoint naming one that is not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / FETCH_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            checked = self._checked()
            for file in sorted(set(files)):
                entry = self.manifest.files[file]
                if checked.get(file) == entry.sha256:
                    continue
                if not matches(self.folder / file, entry):
                    log.info("copying %s/%s (%.1f MB)", self.remote.location(self.name), file, entry.size / 1e6,
                             extra=FILE_ONLY)
                    download_file(self.remote, self.name, file, entry, self.folder / file)
                checked[file] = entry.sha256
                write_atomic(self.folder / CHECKED, json.dumps(checked))

    def _checked(self) -> dict[str, str]:
        try:
            found = json.loads((self.folder / CHECKED).read_text())
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}
