"""Sharded checkpoints of nodes that share no folder (jobs/checkpoint/spread.py): each rank sends its own shard
to the store and rank 0 commits the remote folder last. Real processes (torchrun, gloo) and moto's S3; each
rank has its own folder, as each VM has its own disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from s3_server import S3Server, TEST_CREDENTIALS, s3_server_fixture

pytestmark = pytest.mark.slow
s3_server = pytest.fixture(scope="module")(s3_server_fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SCRIPT = str(REPO / "tests" / "spread_writer.py")


def _torchrun(mode: str, base: Path, server: S3Server) -> subprocess.CompletedProcess:
    env = {**os.environ, **TEST_CREDENTIALS, "OMP_NUM_THREADS": "1", "S3_ENDPOINT": server.endpoint}
    return subprocess.run([*TORCHRUN, SCRIPT, mode, str(base)], env=env, capture_output=True, text=True, timeout=180)


def test_each_rank_sends_its_shard_and_a_killed_upload_or_an_altered_shard_is_never_resumed(
        tmp_path: Path, s3_server: S3Server) -> None:
    """Steps 1 and 2 are committed on the store with a manifest naming both ranks' shards, while each node's
    folder holds only its own rank's files; rank 1 killed while sending its shard of step 3 leaves step 3
    uncommitted. With step 2's shard of rank 1 then altered in the store, a resume on two empty folders
    (rank 1 finds it as its node copies it; DCP fails the load on both ranks) warns naming that file and
    resumes both ranks from step 1, each node copying only what its rank reads."""
    import fsspec

    s3_server.create_bucket("spread")
    saved = _torchrun("save", tmp_path / "a", s3_server)
    assert "COMMITTED 1" in saved.stdout and "COMMITTED 2" in saved.stdout, saved.stdout + saved.stderr
    assert saved.returncode != 0  # rank 1 was killed in step 3

    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True)
    manifest = json.loads(fs.cat_file("spread/run/step-000000002/manifest.json"))
    ranks = {name: entry.get("rank") for name, entry in manifest["files"].items()}
    assert ranks["__0_0.distcp"] == 0 and ranks["__1_0.distcp"] == 1 and "trainer.pt" in ranks, ranks
    assert {p.rsplit("/", 1)[-1] for p in fs.find("spread/run/step-000000002")} == {*ranks, "manifest.json"}
    step3 = {p.rsplit("/", 1)[-1] for p in fs.find("spread/run/step-000000003")}
    assert "__1_0.distcp" in step3 and "manifest.json" not in step3, step3  # half sent, never committed
    # nothing committed on a node's disk, and node 1 never held rank 0's shard
    node0, node1 = tmp_path / "a" / "node0", tmp_path / "a" / "node1"
    assert not list(node0.glob("step-*/manifest.json")) and not list(node1.glob("step-*/manifest.json"))
    assert {p.relative_to(node1).as_posix() for p in node1.glob("step-*/*")} == \
        {f"step-00000000{n}/__1_0.distcp" for n in (1, 2, 3)}

    with fs.open("spread/run/step-000000002/__1_0.distcp", "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    fs.pipe_file("spread/run/step-000000002/__1_0.distcp", bytes(data))

    resumed = _torchrun("resume", tmp_path / "b", s3_server)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "step-000000002/__1_0.distcp does not match" in resumed.stderr, resumed.stderr
    assert "RESUMED 1 0 10.0 s3://spread/run/step-000000001" in resumed.stdout, resumed.stdout
    assert "RESUMED 1 1 11.0 s3://spread/run/step-000000001" in resumed.stdout, resumed.stdout
    for rank in (0, 1):  # each node copied into its own empty folder what its rank reads, no other shard
        copied = {p.name for p in (tmp_path / "b" / f"node{rank}" / "step-000000001").iterdir()}
        assert {f"__{rank}_0.distcp", ".metadata", "trainer.pt"} <= copied, copied
        assert f"__{1 - rank}_0.distcp" not in copied, copied


def test_a_file_another_writer_appends_to_is_hashed_and_streamed_as_it_grows(tmp_path: Path,
                                                                               s3_server: S3Server) -> None:
    """GrowingFile follows a file DCP writes (here a thread appending 20 MB in pieces) and stream_to_s3 sends
    its parts while it grows: the object is the file, byte for byte, over several multipart parts, and the
    entry's size and SHA-256 are the file's. A write that failed fails the stream: nothing is left on S3."""
    import hashlib
    import threading
    import time

    import boto3

    from jobs.checkpoint.stream import GrowingFile, stream_to_s3

    s3_server.create_bucket("grow")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    path = tmp_path / "__1_0.distcp"
    path.write_bytes(b"an older save's bytes")  # removed by start(): never taken for new ones
    data = os.urandom(20 << 20)

    def write() -> None:
        with open(path, "wb") as f:
            for i in range(0, len(data), 3 << 20):
                f.write(data[i:i + (3 << 20)])
                f.flush()
                time.sleep(0.05)

    growing = GrowingFile(path, rank=1)
    growing.start()
    sent: list = []
    sender = threading.Thread(target=lambda: sent.append(stream_to_s3(client, "grow", "k", path, growing.progress,
                                                                      threading.Event())))
    sender.start()
    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    entry = growing.finish(written=True)
    sender.join()
    assert entry is not None and entry.size == len(data) and entry.rank == 1
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and sent == [entry]
    assert client.get_object(Bucket="grow", Key="k")["Body"].read() == data

    failed = GrowingFile(tmp_path / "other", rank=0)
    failed.start()
    sender = threading.Thread(target=lambda: sent.append(stream_to_s3(client, "grow", "f", tmp_path / "other",
                                                                      failed.progress, threading.Event())))
    sender.start()
    (tmp_path / "other").write_bytes(os.urandom(9 << 20))
    assert failed.finish(written=False) is None
    sender.join()
    assert sent[-1] is None and "Contents" not in client.list_objects_v2(Bucket="grow", Prefix="f")
