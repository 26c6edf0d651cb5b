"""Reading checkpoints once: resuming hashes every file exactly once (not when choosing it and again
when loading it), a node-mate of local rank 0 checks sizes only, a file replaced while it is read
is not trusted, and manifests can name the rank that wrote a file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from jobs.checkpoint import MANIFEST, Checkpointer, CorruptCheckpoint, FileEntry, Manifest, step_dir_name
from jobs.schema import CheckpointConfig, StorageConfig


class HashedBytes:
    """Counts the bytes every hashlib.sha256 object of the process is fed (a spy, not a mock: the
    real hash is computed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        real, spy = hashlib.sha256, self

        class Counting:
            def __init__(self, data: bytes = b"") -> None:
                self._h = real(data)
                spy.total += len(data)

            def update(self, data: Any) -> None:
                spy.total += memoryview(data).nbytes
                self._h.update(data)

            def hexdigest(self) -> str:
                return self._h.hexdigest()

        monkeypatch.setattr(hashlib, "sha256", Counting)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Iterator[HashedBytes]:
    yield HashedBytes(monkeypatch)


def saved(folder: Path, steps: tuple[int, ...] = (1, 2)) -> Checkpointer:
    ckpt = Checkpointer(CheckpointConfig(async_save=False, keep_last=10), folder, None, StorageConfig())
    for step in steps:
        ckpt.save(step, {"model": {"w": torch.full((50_000,), float(step))}, "trainer": {"step": step}}, {})
    return ckpt


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def test_resume_hashes_every_file_once(tmp_path: Path, hashed: HashedBytes) -> None:
    saved(tmp_path)
    reader = Checkpointer(CheckpointConfig(), tmp_path, None, StorageConfig(), is_writer=False)
    hashed.total = 0
    found = reader.load_latest()
    assert found is not None and found[0] == str(tmp_path / step_dir_name(2))
    assert torch.equal(found[1]["model"]["w"], torch.full((50_000,), 2.0))
    assert hashed.total == files_bytes(tmp_path / step_dir_name(2))  # the old code hashed it twice


def test_a_corrupt_newest_local_checkpoint_falls_back_while_reading(tmp_path: Path, hashed: HashedBytes,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    saved(tmp_path)
    flip_a_byte(tmp_path / step_dir_name(2) / "model.pt")
    reader = Checkpointer(CheckpointConfig(), tmp_path, None, StorageConfig(), is_writer=False)
    caplog.set_level(logging.WARNING, logger="jobs.checkpoint")
    hashed.total = 0
    found = reader.load_latest()
    assert found is not None and found[0] == str(tmp_path / step_dir_name(1))
    assert torch.equal(found[1]["model"]["w"], torch.ones(50_000))
    assert any(f"skipping checkpoint {tmp_path / step_dir_name(2)}" in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)
    # step 2 at most once (reading stops at its corrupt file), step 1 exactly once
    assert files_bytes(tmp_path / step_dir_name(1)) <= hashed.total <= \
        files_bytes(tmp_path / step_dir_name(1)) + files_bytes(tmp_path / step_dir_name(2))


def test_node_mates_of_local_rank_0_check_sizes_only(tmp_path: Path, hashed: HashedBytes) -> None:
    saved(tmp_path, steps=(1,))
    location = str(tmp_path / step_dir_name(1))
    flip_a_byte(tmp_path / step_dir_name(1) / "model.pt")
    reader = Checkpointer(CheckpointConfig(), tmp_path, None, StorageConfig(), is_writer=False)
    hashed.total = 0
    reader.load(location, hash_local=False)  # a node-mate of local rank 0, which hashes these very files
    assert hashed.total == 0
    with pytest.raises(CorruptCheckpoint, match="model.pt"):
        reader.load(location)
    model = tmp_path / step_dir_name(1) / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpoint, match="model.pt"):
        reader.load(location, hash_local=False)  # sizes are still checked


def test_a_file_replaced_while_it_is_read_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash pass and torch.load open the file separately: if the name points to another file
    by the time torch.load opens it, what was loaded is not what was checked."""
    saved(tmp_path, steps=(1,))
    model = tmp_path / step_dir_name(1) / "model.pt"
    copy = model.with_name("copy")
    copy.write_bytes(model.read_bytes())  # the same bytes in another file
    real_load = torch.load

    def replace_then_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if str(f) == str(model) and copy.exists():
            os.replace(copy, model)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", replace_then_load)
    reader = Checkpointer(CheckpointConfig(), tmp_path, None, StorageConfig(), is_writer=False)
    with pytest.raises(CorruptCheckpoint, match="replaced while it was read"):
        reader.load(str(tmp_path / step_dir_name(1)))


def test_manifest_entries_can_name_the_rank_that_wrote_them() -> None:
    """Room for sharded saves: one manifest over files of several ranks; a single writer's manifest
    stays exactly as before (no rank field)."""
    files = {"model.pt": FileEntry(10, "ab"), "shard-1.distcp": FileEntry(20, "cd", rank=1)}
    manifest = Manifest(3, {"loss": 0.5}, 1.0, files, "run-a")
    data = json.loads(manifest.to_json())
    assert data["files"]["model.pt"] == {"size": 10, "sha256": "ab"}
    assert data["files"]["shard-1.distcp"] == {"size": 20, "sha256": "cd", "rank": 1}
    assert Manifest.from_json(manifest.to_json()) == manifest
