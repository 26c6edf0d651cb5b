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

The parts, one job each:

    layout.py        the names (step folders, manifest, owner record, pointer, saves log) and the
                     parsing of the records (FileEntry, Manifest); torch-free, imports none of the others
    disk.py          durable local files: fsync, atomic writes, the commit by manifest, the saves log
    store.py         one run's folder on one file system: step folders, verify, committed, remove
    reader.py        loading a committed checkpoint, each file checked once as it is read
    staging.py       what a state may hold, and its copy into reusable host buffers
    saver.py         the background thread that commits async saves
    local.py         the local writer: hashed files, fsync, manifest by atomic rename, pointer
    uploader.py      the remote side, a thin coordinator of: upload_state.py (what its two threads
                     share), owner.py (the owner claim), early.py (files streamed as they are
                     written), rounds.py (retried upload rounds, remote pruning), published.py (the
                     remote pointer and the saves log), remote_files.py (single requests), backoff.py
    retention.py     which checkpoints to keep, and pruning the rest
    policy.py        when to save and which checkpoint is the best, decided once (torch-free)
    checkpointer.py  Checkpointer, the facade the trainer uses
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The package's names load on first use (PEP 562), so importing a torch-free part (jobs.checkpoint.layout,
# which jobs.storage and the launcher read) does not import torch through this file.
_EXPORTS = {
    "Checkpointer": "checkpointer", "CheckpointError": "errors", "CorruptCheckpoint": "errors",
    "ForeignRunFolder": "errors", "InvalidCheckpoint": "errors", "StateWriter": "local", "FileEntry": "layout",
    "Manifest": "layout", "MANIFEST": "layout", "step_dir_name": "layout", "load_checkpoint": "reader",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from jobs.checkpoint.checkpointer import Checkpointer
    from jobs.checkpoint.errors import CheckpointError, CorruptCheckpoint, ForeignRunFolder, InvalidCheckpoint
    from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest, step_dir_name
    from jobs.checkpoint.local import StateWriter
    from jobs.checkpoint.reader import load_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value
