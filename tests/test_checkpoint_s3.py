"""Checkpointer against object stores: a moto S3 server on loopback (uploads, outages, resume from the
remote, credentials never written) and a remote folder that refuses a file. Nothing is mocked."""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from jobs.checkpoint import MANIFEST, CheckpointError, Checkpointer, step_dir_name
from jobs.storage import filesystem
from jobs.schema import StorageConfig
from s3_server import S3Server, free_port, s3_env, s3_server_fixture  # noqa: F401  (s3_env is a fixture)
from test_checkpoint import assert_same, committed_steps, make_cfg, trained_state

s3_server = pytest.fixture(scope="module")(s3_server_fixture)
pytestmark = pytest.mark.slow  # a moto server on loopback

BUCKET = "ckpt-tests"


# ----------------------------------------------------------------------------- 5. S3 (moto)
def s3_checkpointer(server: S3Server, local: Path, run: str, writer: bool = True, **cfg: Any) -> Checkpointer:
    return Checkpointer(make_cfg(**cfg), local, f"s3://{BUCKET}/runs/{run}",
                        StorageConfig(endpoint_url=server.endpoint), is_writer=writer)


@pytest.fixture
def bucket(s3_server: S3Server, s3_env: dict[str, str]) -> Iterator[S3Server]:
    s3_server.start()  # a previous test may have stopped it
    try:
        s3_server.create_bucket(BUCKET)
    except Exception as err:  # noqa: BLE001 - already there is fine
        if "BucketAlready" not in type(err).__name__ + str(err):
            raise
    yield s3_server


def test_s3_async_saves_commit_remotely_and_resume_from_there(bucket: S3Server, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    _, _, state = trained_state()
    ckpt = s3_checkpointer(bucket, tmp_path / "local", "roundtrip", async_save=True)
    reader = s3_checkpointer(bucket, tmp_path / "other-node", "roundtrip", writer=False)
    ckpt.save(1, state, {"loss": 1.0})
    assert ckpt.flush(20)
    assert reader.latest() == f"s3://{BUCKET}/runs/roundtrip/step-000000001"
    ckpt.save(2, state, {"loss": 0.5})
    assert ckpt.flush(20)
    ckpt.close()
    fs, root = filesystem(f"s3://{BUCKET}/runs/roundtrip", StorageConfig(endpoint_url=bucket.endpoint))
    assert committed_steps(fs, root) == {1, 2}
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/step-000000002")} == \
        {MANIFEST, "model.pt", "optimizer.pt", "trainer.pt", "rng.pt"}

    # A newer half upload (no manifest) and a newer truncated one must not be resumed from.
    fs.pipe_file(f"{root}/step-000000003/model.pt", b"partial")
    fs.copy(f"{root}/step-000000002", f"{root}/step-000000004", recursive=True)
    fs.pipe_file(f"{root}/step-000000004/model.pt", b"truncated")
    shutil.rmtree(tmp_path / "local")
    caplog.set_level(logging.WARNING, logger="jobs.checkpoint")
    found = reader.latest()  # the same reader: s3fs's listing cache must not hide the new folders
    assert found == f"s3://{BUCKET}/runs/roundtrip/step-000000002"
    assert any("step-000000003" in r.getMessage() for r in caplog.records)
    assert any("step-000000004" in r.getMessage() for r in caplog.records)
    assert_same(state, reader.load(found or ""))


def test_s3_outage_does_not_stop_training(bucket: S3Server, tmp_path: Path) -> None:
    local = tmp_path / "local"
    ckpt = s3_checkpointer(bucket, local, "outage", async_save=True, keep_last=2)
    ckpt.save(1, {"model": {"w": torch.ones(1000)}}, {})
    assert ckpt.flush(20)

    bucket.stop()
    for step in (2, 3, 4):
        started = time.perf_counter()
        ckpt.save(step, {"model": {"w": torch.full((1000,), float(step))}}, {})
        assert time.perf_counter() - started < 0.5, "save() must not wait for the store"
        time.sleep(0.2)
    started = time.perf_counter()
    assert not ckpt.flush(timeout=2.0)
    assert time.perf_counter() - started < 5
    assert all((local / step_dir_name(s) / MANIFEST).is_file() for s in (3, 4))  # kept until uploaded
    assert ckpt.latest() == str(local / "step-000000004")  # the store is down: the local copy

    bucket.start()  # an empty server: everything not yet uploaded must be sent again
    bucket.create_bucket(BUCKET)
    assert ckpt.flush(timeout=30)
    ckpt.close()
    fs, root = filesystem(f"s3://{BUCKET}/runs/outage", StorageConfig(endpoint_url=bucket.endpoint))
    assert committed_steps(fs, root) == {3, 4}
    reader = s3_checkpointer(bucket, tmp_path / "other-node", "outage", writer=False)
    assert reader.latest() == f"s3://{BUCKET}/runs/outage/step-000000004"
    assert torch.equal(reader.load(reader.latest() or "")["model"]["w"], torch.full((1000,), 4.0))


def test_a_file_streams_to_s3_while_it_is_written(bucket: S3Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A save's upload runs alongside its local write (what a spot notice's seconds need): parts of model.pt
    are in S3 while the writer is paused in the middle of it, nothing is committed there before the local
    commit, and the round after the commit sends no file again."""
    import boto3

    import jobs.checkpoint.remote_files as uploader
    from jobs.checkpoint import stream

    client = boto3.client("s3", endpoint_url=bucket.endpoint, region_name="us-east-1")
    run = f"s3://{BUCKET}/runs/stream"
    seen: dict[str, int] = {}

    def parts_in_s3() -> int:
        for upload in client.list_multipart_uploads(Bucket=BUCKET, Prefix="runs/stream/").get("Uploads", []):
            if upload["Key"].endswith("/model.pt"):
                listed = client.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
                return len(listed.get("Parts", []))
        return 0

    advance = stream.FileProgress.advance

    def pause_mid_file(self: stream.FileProgress, n: int) -> None:
        advance(self, n)
        if self.written >= 3 * stream.part_bytes(1) and "parts" not in seen:  # the writer, 24 MiB into model.pt
            seen["parts"] = 0
            deadline = time.monotonic() + 30
            while not seen["parts"] and time.monotonic() < deadline:
                seen["parts"] = parts_in_s3()
                time.sleep(0.05)
            seen["manifests"] = client.list_objects_v2(Bucket=BUCKET, Prefix="runs/stream/step-").get("KeyCount", 0)

    resent: list[str] = []
    put = uploader.put_file
    monkeypatch.setattr(stream.FileProgress, "advance", pause_mid_file)
    monkeypatch.setattr(uploader, "put_file", lambda fs, src, target: (resent.append(target), put(fs, src, target)))
    state = {"model": {"w": torch.randn(10_000_000)}, "trainer": {"step": 1}}  # model.pt: 40 MB, 5 parts
    ckpt = s3_checkpointer(bucket, tmp_path / "local", "stream", async_save=True)
    ckpt.save(1, state, {})
    assert ckpt.flush(60)
    ckpt.close()
    assert seen["parts"] >= 1 and seen["manifests"] == 0, seen
    assert resent == []  # streamed (model.pt) or sent in one request once written (trainer.pt), never twice
    fs, root = filesystem(run, StorageConfig(endpoint_url=bucket.endpoint))
    assert committed_steps(fs, root) == {1}
    assert client.list_multipart_uploads(Bucket=BUCKET, Prefix="runs/stream/").get("Uploads", []) == []
    loaded = Checkpointer(make_cfg(), tmp_path / "fresh", run, StorageConfig(endpoint_url=bucket.endpoint)).load_latest()
    assert loaded is not None
    assert_same(loaded[1], state)


@pytest.mark.parametrize("size", [0, 1, 8 << 20, (8 << 20) + 1, 3 * (8 << 20), 3 * (8 << 20) + 12345])
def test_streamed_files_of_any_size_arrive_whole(bucket: S3Server, tmp_path: Path, size: int) -> None:
    """Part boundaries: empty, one byte, exactly one part, one past it, whole parts, a ragged tail; the
    writer's chunks straddle the parts."""
    import threading

    import boto3

    from jobs.checkpoint.layout import FileEntry
    from jobs.checkpoint.stream import FileProgress, stream_to_s3

    client = boto3.client("s3", endpoint_url=bucket.endpoint, region_name="us-east-1")
    data, path, progress = os.urandom(size), tmp_path / "blob", FileProgress()

    def write() -> None:
        with open(path, "wb") as f:
            for start in range(0, size, 3_000_001):
                f.write(data[start:start + 3_000_001])
                f.flush()
                progress.advance(len(data[start:start + 3_000_001]))
        progress.finish(FileEntry(size, "unused"))

    path.touch()
    writer = threading.Thread(target=write)
    writer.start()
    entry = stream_to_s3(client, BUCKET, f"sizes/{size}", path, progress, threading.Event())
    writer.join()
    assert entry is not None and entry.size == size
    assert client.get_object(Bucket=BUCKET, Key=f"sizes/{size}")["Body"].read() == data


def test_manifest_is_uploaded_only_after_every_file(tmp_path: Path) -> None:
    """A remote (here a local folder) that refuses one file: no manifest there until it is fixed."""
    remote_dir = tmp_path / "remote"
    blocker = remote_dir / "step-000000002" / "optimizer.pt"
    blocker.mkdir(parents=True)  # uploading a file onto a folder fails; model.pt before it succeeds
    _, _, state = trained_state()
    ckpt = Checkpointer(make_cfg(async_save=True, upload_retries=1), tmp_path / "local", f"file://{remote_dir}",
                        StorageConfig())
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
    assert not ckpt.flush(timeout=1.0)
    assert (remote_dir / "step-000000002" / "model.pt").is_file()
    assert not (remote_dir / "step-000000002" / MANIFEST).exists()
    assert (remote_dir / "step-000000001" / MANIFEST).is_file()
    blocker.rmdir()
    assert ckpt.flush(timeout=10)
    ckpt.close()
    assert (remote_dir / "step-000000002" / MANIFEST).is_file()
    reader = Checkpointer(make_cfg(), tmp_path / "empty", f"file://{remote_dir}", StorageConfig(), is_writer=False)
    assert reader.latest() == f"file://{remote_dir}/step-000000002"


def test_unreachable_store_with_nothing_local_is_an_error(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """Returning None would restart training from step 0 while the store may hold the run."""
    ckpt = Checkpointer(make_cfg(upload_retries=1), tmp_path, "s3://nowhere/run",
                        StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}"), is_writer=False)
    with pytest.raises(CheckpointError, match="cannot list checkpoints at s3://nowhere/run"):
        ckpt.latest()


# ----------------------------------------------------------------------------- 7. credentials
def test_s3_secret_is_not_written_or_logged(bucket: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key
    caplog.set_level(logging.DEBUG)
    ckpt = s3_checkpointer(bucket, tmp_path, "secret", async_save=True)
    ckpt.save(1, {"model": {"w": torch.ones(10)}}, {"loss": 1.0})
    assert ckpt.flush(20)
    bucket.stop()  # failures are logged too
    ckpt.save(2, {"model": {"w": torch.ones(10)}}, {"loss": 1.0})
    assert not ckpt.flush(1.0)
    deadline = time.monotonic() + 30  # the failure is logged once the client gives up: let it, before close()
    while not any("failed" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.1)
    ckpt.close()
    bucket.start()
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
