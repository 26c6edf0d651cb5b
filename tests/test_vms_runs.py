"""Runs on "VMs": a real sshd on loopback addresses (scripts/vms_local.sh), each address a host with its own
folder (no run directory is shared), metadata servers on the hosts' own addresses standing in for GCE/AWS,
moto's S3 holding the checkpoints, and real torchrun ranks on every node meeting in a c10d rendezvous."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import REPO, run_cli, wait_until
from metadata_server import MetadataServer
from s3_server import S3Server, TEST_CREDENTIALS, s3_server_fixture

pytestmark = pytest.mark.slow
s3_server = pytest.fixture(scope="module")(s3_server_fixture)

HOSTS = ["127.0.0.2", "127.0.0.3"]
# digits, small and deterministic; every 2 steps a checkpoint, so a notice loses at most the steps since
DIGITS = ["trainer.max_steps=12", "checkpoint.every_steps=2", "trainer.eval_every=0", "logging.log_every=1"]


def vm_cluster(folder: Path, state: Path, s3: S3Server, **vms: object) -> Path:
    """A cluster config for the loopback VMs, with this test's own folders on each host."""
    config = {"backend": "vms", "storage": {"endpoint_url": s3.endpoint},
              "vms": {"hosts": HOSTS, "user": "root", "identity_file": str(state / "client_key"), "port": 2222,
                      "known_hosts": "ignore", "remote_dir": str(folder / "hosts" / "{host}"),
                      "python": sys.executable, "env": {"OMP_NUM_THREADS": "1", **TEST_CREDENTIALS},
                      "host_wait_s": 60, **vms}}
    path = folder / "vms.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def host_run(folder: Path, host: str, name: str) -> Path:
    return folder / "hosts" / host / "runs" / name


def head_info(folder: Path, name: str) -> dict:
    path = host_run(folder, HOSTS[0], name) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def steps_logged(folder: Path, name: str) -> int:
    """The highest step rank 0 logged, on whichever host it runs."""
    best = 0
    for host in HOSTS:
        path = host_run(folder, host, name) / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().split("\n")[:-1]
            best = max([best] + [json.loads(x).get("step", 0) for x in lines if x.strip()])
    return best


@pytest.fixture
def metadata() -> Iterator[dict[str, MetadataServer]]:
    servers = {host: MetadataServer(host, 8999) for host in HOSTS}
    for server in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def launch(cluster: Path, runs: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("launch", "digits", *DIGITS, *overrides, "--cluster", str(cluster), "--run-name", name,
                   runs_dir=runs, env=TEST_CREDENTIALS, timeout=120)


def wait_state(runs: Path, cluster: Path, name: str, timeout: float = 300) -> dict:
    """`launcher status` until the run has ended; its last answer."""
    def ended() -> dict:
        out = run_cli("status", name, "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS)
        fields = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
        return fields if fields.get("state") in ("completed", "stopped", "cancelled", "failed", "lost") else {}
    return wait_until(ended, f"run {name} to end", timeout=timeout, poll=1.0)


def exported(runs: Path, cluster: Path, name: str, out: Path) -> dict:
    import torch

    run_cli("export", name, "--to", str(out), "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS,
            check=True)
    return torch.load(out, weights_only=True)


def test_gce_notice_on_one_node_saves_relaunches_and_matches_a_single_node_run(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer],
        uninterrupted_digits: dict) -> None:
    """2 nodes x 2 ranks; a GCE preemption notice on node 1 mid-run: every rank saves one checkpoint
    together (uploaded within the notice window), the supervisor relaunches, the ranks resume from S3, and
    the final weights are bit-equal to an uninterrupted single-node run with the same world size."""
    s3_server.create_bucket("vmgce")
    cluster = vm_cluster(tmp_path, vm_hosts, s3_server, provider="gce", metadata_url="http://{host}:8999")
    runs = tmp_path / "runs"
    out = launch(cluster, runs, "gce", "parallel.nodes=2", "parallel.procs_per_node=2",
                 "checkpoint.uri=s3://vmgce/runs")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: steps_logged(tmp_path, "gce") >= 3, "step 3", timeout=180)
    metadata[HOSTS[1]].notice()
    status = wait_state(runs, cluster, "gce")
    assert status["state"] == "completed", status
    info = head_info(tmp_path, "gce")
    assert info["requeues"] == {"preemptions": 1}, info
    assert "spot notice on 127.0.0.3" in info["last_requeue"]
    # every node had exited, rank 0 after flushing the stop's checkpoint to S3, within GCE's 30 s
    assert info["notice_to_saved_s"] < 30, info
    final = exported(runs, cluster, "gce", tmp_path / "gce.pt")
    reference = uninterrupted_digits
    assert final.keys() == reference.keys()
    for key in final:
        assert torch_equal(final[key], reference[key]), key


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def uninterrupted_digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run on one node with 4 ranks, never stopped."""
    import torch

    runs = tmp_path_factory.mktemp("straight")
    run_cli("launch", "digits", *DIGITS, "parallel.procs_per_node=4", "--run-name", "straight", runs_dir=runs,
            check=True)
    return torch.load(runs / "straight" / "model.pt", weights_only=True)
