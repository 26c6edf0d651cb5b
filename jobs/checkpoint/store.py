"""One run's checkpoint folder on one file system (the local disk or the remote store): which step
folders exist, which of them are committed, and removing them."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from jobs.checkpoint.disk import commit_folder
from jobs.checkpoint.errors import CorruptCheckpoint, InvalidCheckpoint
from jobs.checkpoint.layout import MANIFEST, FileEntry, Manifest, parse_step_dir, step_dir_name
from jobs.storage import fresh_listing, join

HASH_CHUNK = 8 << 20


@dataclass
class Store:
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
            step = parse_step_dir(name)
            if step is not None and entry["type"] == "directory":
                out[name] = step
        return out

    def verify(self, name: str, full_hash: bool) -> Manifest:
        """The manifest of a committed checkpoint; raises InvalidCheckpoint saying what is wrong.

        Sizes are always checked (they catch truncation and half uploads); SHA-256 only with
        `full_hash`, since that reads every byte: a reader checks the hashes as it loads instead.
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
            if full_hash and sha256_of(self.fs, self.path(name, file)) != entry.sha256:
                raise InvalidCheckpoint(f"{file} does not match its SHA-256 in the manifest (corrupted)")
        return manifest

    def is_intact(self, name: str) -> bool:
        """Committed, with every file matching its hash."""
        try:
            self.verify(name, full_hash=True)
            return True
        except (InvalidCheckpoint, FileNotFoundError):
            return False

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


def sha256_of(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_folder(remote: Store, name: str, manifest: Manifest, folder: Path) -> None:
    """Copy a committed remote checkpoint into the local `folder` and commit it there: files
    streamed and checked against the manifest (size and SHA-256), fsynced, then the manifest. A file
    already there with the manifest's size and SHA-256 is kept (a node's own shard, on a restart).
    Raises CorruptCheckpoint for a file that does not match."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # uncommitted while its files are replaced
    for file, entry in manifest.files.items():
        if not matches(folder / file, entry):
            download_file(remote, name, file, entry, folder / file)
    commit_folder(folder, manifest)


def download_file(remote: Store, name: str, file: str, entry: FileEntry, dest: Path) -> None:
    """`file` of remote checkpoint `name` streamed into `dest`, fsynced, checked against its manifest `entry`
    (size and SHA-256): CorruptCheckpoint naming it if it does not match."""
    digest, size = hashlib.sha256(), 0
    with remote.fs.open(remote.path(name, file), "rb") as src, open(dest, "wb") as dst:
        while chunk := src.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise CorruptCheckpoint(f"{remote.location(name)}/{file} does not match the size/SHA-256 in its "
                                f"manifest: the checkpoint is corrupt")


def matches(path: Path, entry: FileEntry) -> bool:
    """Whether the local file at `path` is the one `entry` describes (its size, then its SHA-256)."""
    try:
        return path.stat().st_size == entry.size and sha256_of(LocalFileSystem(), str(path)) == entry.sha256
    except OSError:
        return False
