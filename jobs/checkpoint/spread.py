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

A resume: rank 0 picks the newest remote checkpoint that downloads intact (a file that does not match
its manifest skips it, with a warning naming the file) and tells the others its location; on every
node one rank copies it into the node's folder (files already there with the right hash are kept)
while the node's other ranks wait on a lock, and DCP reads and reshards from there. A replacement VM
with an empty disk resumes the same way.
"""
from __future__ import annotations

import fcntl
import shutil
import threading
from pathlib import Path
from typing import Optional, Protocol

from jobs.checkpoint.errors import FILE_ONLY, log
from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest, parse_step_dir
from jobs.checkpoint.store import Store, download_folder
from jobs.checkpoint.stream import FileProgress, GrowingFile

FETCH_LOCK = ".fetching"  # in the step folder: the node's ranks copy a checkpoint once


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
