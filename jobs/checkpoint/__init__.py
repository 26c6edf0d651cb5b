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

    manifest.py      the commit record (FileEntry, Manifest) and step folder names
    store.py         one run's folder on one file system: step folders, verify, committed, remove
    reader.py        loading a committed checkpoint, each file checked once as it is read
    staging.py       what a state may hold, and its copy into reusable host buffers
    saver.py         the background thread that commits async saves
    local.py         the local writer: hashed files, fsync, manifest by atomic rename, pointer
    uploader.py      the remote side: upload rounds (thread, backoff), listing, the owner record
    retention.py     which checkpoints to keep, and pruning the rest
    checkpointer.py  Checkpointer, the facade the trainer uses
"""
from jobs.checkpoint.checkpointer import Checkpointer
from jobs.checkpoint.errors import CheckpointError, CorruptCheckpoint, ForeignRunFolder, InvalidCheckpoint
from jobs.checkpoint.local import StateWriter
from jobs.checkpoint.manifest import FileEntry, Manifest, step_dir_name
from jobs.checkpoint.reader import load_checkpoint
from jobs.schema.run_dir import MANIFEST

__all__ = ["MANIFEST", "CheckpointError", "Checkpointer", "CorruptCheckpoint", "FileEntry", "ForeignRunFolder",
           "InvalidCheckpoint", "Manifest", "StateWriter", "load_checkpoint", "step_dir_name"]
