"""Single requests against the remote copy of a run's checkpoints: a local file put and confirmed by
its size, a small text put atomically, a manifest read. No retries here (backoff.py) and no
decisions (rounds.py): each call is one thing the store is asked."""
from __future__ import annotations

from typing import Optional

from jobs.checkpoint.layout import MANIFEST, Manifest
from jobs.checkpoint.store import Store
from jobs.storage import is_local, put_file


class RemoteFiles:
    """`local`'s step folders copied to `remote`'s, by name."""

    def __init__(self, local: Store, remote: Store) -> None:
        self.local, self.remote = local, remote

    def manifest(self, name: str) -> Optional[Manifest]:
        """The committed remote manifest of `name`; None if absent, unreadable or unreachable."""
        try:
            return Manifest.from_json(self.remote.fs.cat_file(self.remote.path(name, MANIFEST)))
        except Exception:
            return None  # upload it (with retries)

    def uncommit(self, name: str) -> None:
        self.remote.fs.rm_file(self.remote.path(name, MANIFEST))

    def put_confirmed(self, name: str, file: str, size: int) -> None:
        remote = self.remote
        if is_local(remote.fs):
            remote.fs.makedirs(remote.path(name), exist_ok=True)
        put_file(remote.fs, self.local.path(name, file), remote.path(name, file))
        self.confirm_size(name, file, size)

    def size_on_store(self, name: str, file: str) -> int:
        """The file's size as the store has it now (one HEAD request; fsspec's listing cache bypassed)."""
        target = self.remote.path(name, file)
        self.remote.fs.invalidate_cache(target)
        return self.remote.fs.info(target)["size"]

    def confirm_size(self, name: str, file: str, size: int) -> None:
        landed = self.size_on_store(name, file)
        if landed != size:
            raise OSError(f"{self.remote.location(name)}/{file} has {landed} bytes after upload, expected {size}")

    def put_text(self, name: str, file: str, text: str) -> None:
        """`file` of step folder `name` (or of the root, name ""). A single PUT is atomic on object
        stores; a local-disk remote needs the rename."""
        remote = self.remote
        target = remote.path(name, file) if name else remote.path(file)
        if is_local(remote.fs):
            remote.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            remote.fs.pipe_file(target + ".tmp", text.encode())
            remote.fs.mv(target + ".tmp", target)
        else:
            remote.fs.pipe_file(target, text.encode())
