"""A real S3 server on loopback for tests: moto's standalone server in a subprocess.

`stop()` kills it (clients get "connection refused", like a store that went down) and `start()`
brings a fresh one up on the same port. moto keeps its data in memory, so a restarted server has
no buckets: tests recreate theirs with `create_bucket()`.

    server = start_s3_server()        # or the `s3_server` fixture (tests register it themselves)
    StorageConfig(endpoint_url=server.endpoint)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        if self._proc is not None:
            return
        # moto logs a line per request on stderr: into a file, never a pipe nobody reads (after ~64 KB of
        # requests the server would block on its next write, and every client stall with it)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **TEST_CREDENTIALS},
            preexec_fn=_die_with_parent)
        self._wait_ready(timeout)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._log.close()
        self._proc = None

    def create_bucket(self, name: str) -> None:
        import boto3  # a dependency of moto

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise RuntimeError(f"moto server on port {self.port} exited with {self._proc.returncode}: "
                                   f"{err[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server on port {self.port} did not answer within {timeout} s; "
                           f"is moto[server] installed in {sys.executable}?")


def _die_with_parent() -> None:
    """Linux: the server gets SIGKILL when the test process dies, so a killed pytest leaves no orphan."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server() -> S3Server:
    server = S3Server(free_port())
    server.start()
    return server


def s3_cluster(folder: Path, bucket: str) -> Iterator[tuple[S3Server, Path]]:
    """A fresh server with `bucket`, and a local cluster config whose storage endpoint is that server
    (the only place the endpoint is given, as a user would)."""
    server = start_s3_server()
    server.create_bucket(bucket)
    cluster = folder / "s3_local.yaml"
    cluster.write_text(yaml.safe_dump({"backend": "local", "storage": {"endpoint_url": server.endpoint}}))
    try:
        yield server, cluster
    finally:
        server.stop()


def s3_server_fixture() -> Iterator[S3Server]:
    """Body of a module- or session-scoped fixture:
    `s3_server = pytest.fixture(scope="module")(s3_server_fixture)`."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials for moto, and no AWS settings of the machine leaking into the test."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    return dict(TEST_CREDENTIALS)
