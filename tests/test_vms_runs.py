"""Runs on "VMs": a real sshd on loopback addresses (scripts/vms_local.sh), each address a host with its own
folder (no run directory is shared), metadata servers on the hosts' own addresses standing in for GCE/AWS,
moto's S3 holding the checkpoints, and real torchrun ranks on every node meeting in a c10d rendezvous.

Bit-equality after a stop is checked with 2 ranks: with 3 or more, DDP's first step after any restart
sums gradients in another order (its buckets are rebuilt after the first iteration), 1 ulp apart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from conftest import REPO, run_cli, wait_until
from metadata_server import MetadataServer
from s3_server import S3Server, TEST_CREDENTIALS, free_port, s3_server_fixture

pytestmark = pytest.mark.slow
s3_server = pytest.fixture(scope="module")(s3_server_fixture)

HOSTS = ["127.0.0.2", "127.0.0.3"]
REPLACEMENT = "127.0.0.4"  # a VM that replaces a preempted one: another address, an empty disk
DIGITS = ["trainer.max_steps=40", "checkpoint.every_steps=10", "trainer.micro_batch=16", "logging.log_every=1"]
TWO_NODES = ["parallel.nodes=2", "parallel.procs_per_node=1", "trainer.micro_batch=32"]


def vm_cluster(folder: Path, state: Path, s3: S3Server, **vms: object) -> Path:
    """A cluster config for the loopback VMs, with this test's own folders on each host."""
    config = {"backend": "vms", "storage": {"endpoint_url": s3.endpoint},
              "vms": {"hosts": HOSTS, "user": "root", "identity_file": str(state / "client_key"), "port": 2222,
                      "known_hosts": "ignore", "remote_dir": str(folder / "hosts" / "{host}"),
                      "python": sys.executable, "env": {"OMP_NUM_THREADS": "1", **TEST_CREDENTIALS},
                      "host_wait_s": 60, "rdzv_port": free_port(), **vms}}  # a port of its own: VM tests run side by side
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
    for host in [*HOSTS, REPLACEMENT]:
        path = host_run(folder, host, name) / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().split("\n")[:-1]
            best = max([best] + [json.loads(x).get("step", 0) for x in lines if x.strip()])
    return best


@pytest.fixture
def metadata() -> Iterator[dict[str, MetadataServer]]:
    port = free_port()  # the same on every host's address, as 80 is on every VM
    servers = {host: MetadataServer(host, port) for host in [*HOSTS, REPLACEMENT]}
    for server in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def cli(cluster: Path, runs: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(*args, "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS, timeout=timeout)


def launch(cluster: Path, runs: Path, name: str, *overrides: str) -> None:
    out = cli(cluster, runs, "launch", "digits", *DIGITS, *overrides, "--run-name", name)
    assert out.returncode == 0, out.stdout + out.stderr


def status(cluster: Path, runs: Path, name: str) -> dict[str, str]:
    out = cli(cluster, runs, "status", name)
    return dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)


def wait_state(cluster: Path, runs: Path, name: str, timeout: float = 300) -> dict[str, str]:
    """`launcher status` until the run has ended; its last answer."""
    def ended() -> dict[str, str]:
        fields = status(cluster, runs, name)
        return fields if fields.get("state") in ("completed", "stopped", "cancelled", "failed", "lost") else {}
    return wait_until(ended, f"run {name} to end", timeout=timeout, poll=1.0)


def exported(cluster: Path, runs: Path, name: str, out: Path) -> dict:
    """The newest checkpoint's weights, read back from S3 by `launcher export` on this machine."""
    import torch

    done = cli(cluster, runs, "export", name, "--to", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out, weights_only=True)


def assert_bit_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict]:
    """Final weights of the same run on one node with N ranks, never stopped (made once per N)."""
    import torch

    cache: dict[int, dict] = {}

    def get(ranks: int) -> dict:
        if ranks not in cache:
            runs = tmp_path_factory.mktemp("straight")
            micro = ["trainer.micro_batch=32"] if ranks == 2 else []
            run_cli("launch", "digits", *DIGITS, *micro, f"parallel.procs_per_node={ranks}", "--run-name", "s",
                    runs_dir=runs, check=True)
            cache[ranks] = torch.load(runs / "s" / "model.pt", weights_only=True)
        return cache[ranks]
    return get


def test_two_nodes_of_two_ranks_train_what_one_node_of_four_does(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, straight: Callable[[int], dict]) -> None:
    """One torchrun per node, c10d rendezvous on node 0, each node in its own folder: the same weights as
    one node with the same world size; `launch --wait` follows it and reports the result here."""
    s3_server.create_bucket("vm22")
    # a setup line with a comment (issue 23: it used to make the agent's command a comment, starting nothing)
    cluster = vm_cluster(tmp_path, vm_hosts, s3_server, setup=["export SETUP_RAN=1  # a comment", "true;"])
    runs = tmp_path / "runs"
    out = cli(cluster, runs, "launch", "digits", *DIGITS, "parallel.nodes=2", "parallel.procs_per_node=2",
              "checkpoint.uri=s3://vm22/runs", "--run-name", "two", "--wait", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run two has stopped: completed" in out.stdout
    assert json.loads((runs / "two" / "result.json").read_text())["step"] == 40  # copied back from node 0
    assert (tmp_path / "hosts" / HOSTS[0] / "ssh").stat().st_mode & 0o777 == 0o700  # the key's folder on node 0
    info = head_info(tmp_path, "two")
    assert info["placement"] == {HOSTS[0]: [0, 1], HOSTS[1]: [2, 3]} or \
        info["placement"] == {HOSTS[1]: [0, 1], HOSTS[0]: [2, 3]}, info
    for host in HOSTS:  # each node wrote its own ranks' logs into its own folder
        ranks = info["placement"][host]
        assert sorted(p.name for p in (host_run(tmp_path, host, "two") / "logs").glob("rank*.log")) == \
            [f"rank{r}.log" for r in ranks]
    logs = cli(cluster, runs, "logs", "two", "--rank", "3", "--follow")  # from the VM that ran rank 3
    assert logs.returncode == 0 and "rank 3 of 4" in logs.stdout, logs.stdout + logs.stderr
    rank0_host = next(h for h, r in info["placement"].items() if 0 in r)
    import torch

    assert_bit_equal(torch.load(host_run(tmp_path, rank0_host, "two") / "model.pt", weights_only=True), straight(4))


def test_gce_notice_then_a_replacement_vm_resumes_bit_equal(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer],
        straight: Callable[[int], dict]) -> None:
    """A GCE preemption notice on node 1 mid-run: every rank saves one checkpoint together and rank 0
    uploads it within the notice window. The VM is gone (the hosts command no longer prints it) until a
    replacement with another address appears; the supervisor waits, copies code and run files to the new
    VM, relaunches, the ranks resume from S3, and the final weights are bit-equal to an uninterrupted run."""
    s3_server.create_bucket("vmgce")
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("\n".join(HOSTS) + "\n")
    cluster = vm_cluster(tmp_path, vm_hosts, s3_server, hosts=[], hosts_command=f"cat {hosts_file}",
                         provider="gce", metadata_url=f"http://{{host}}:{metadata[HOSTS[0]].port}")
    runs = tmp_path / "runs"
    launch(cluster, runs, "gce", *TWO_NODES, "checkpoint.uri=s3://vmgce/runs")
    wait_until(lambda: steps_logged(tmp_path, "gce") >= 3, "step 3", timeout=180, poll=0.05)
    hosts_file.write_text(f"{HOSTS[0]}\n")  # node 1 is taken away...
    metadata[HOSTS[1]].notice()  # ...after its notice
    wait_until(lambda: head_info(tmp_path, "gce").get("state") == "waiting_for_hosts", "the supervisor to wait")
    hosts_file.write_text(f"{HOSTS[0]}\n{REPLACEMENT}\n")  # the instance group's replacement VM
    assert wait_state(cluster, runs, "gce")["state"] == "completed"
    info = head_info(tmp_path, "gce")
    assert info["requeues"] == {"preemptions": 1}, info
    assert "spot notice on 127.0.0.3" in info["last_requeue"]
    assert info["hosts"] == [HOSTS[0], REPLACEMENT]
    # every node had exited, rank 0 after flushing the stop's checkpoint to S3, within GCE's 30 s
    assert info["notice_to_saved_s"] < 30, info
    logs = "".join(p.read_text() for p in (tmp_path / "hosts").glob("*/runs/gce/logs/rank0.log"))
    assert "resumed from s3://vmgce/runs/gce/step-" in logs
    assert_bit_equal(exported(cluster, runs, "gce", tmp_path / "gce.pt"), straight(2))


def test_aws_notice_saves_and_relaunches_on_the_same_vms(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer],
        straight: Callable[[int], dict]) -> None:
    """An AWS spot interruption notice (IMDSv2) on node 1: the same save, relaunch and resume; the notice
    was read with a session token, as IMDSv2 requires."""
    s3_server.create_bucket("vmaws")
    cluster = vm_cluster(tmp_path, vm_hosts, s3_server, provider="aws", notice_poll_s=0.2,
                         metadata_url=f"http://{{host}}:{metadata[HOSTS[0]].port}")
    runs = tmp_path / "runs"
    launch(cluster, runs, "aws", *TWO_NODES, "checkpoint.uri=s3://vmaws/runs")
    wait_until(lambda: steps_logged(tmp_path, "aws") >= 3, "step 3", timeout=180, poll=0.05)
    metadata[HOSTS[1]].notice()
    wait_until(lambda: head_info(tmp_path, "aws").get("requeues"), "the preemption to be counted")
    metadata[HOSTS[1]].reset()  # the VM came back without a pending notice
    assert wait_state(cluster, runs, "aws")["state"] == "completed"
    info = head_info(tmp_path, "aws")
    assert info["requeues"] == {"preemptions": 1}, info
    assert info["last_notice"]["provider"] == "aws" and "terminate" in info["last_notice"]["detail"]
    assert any(r.headers.get("X-aws-ec2-metadata-token") for r in metadata[HOSTS[1]].requests)
    assert_bit_equal(exported(cluster, runs, "aws", tmp_path / "aws.pt"), straight(2))


def test_the_run_outlives_the_launcher_and_cancel_reaches_it(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server) -> None:
    """`launch --wait` killed mid-run: the run goes on (its supervisor runs on node 0); `status` from a new
    process finds it running, `cancel` stops it with a checkpoint committed in S3."""
    s3_server.create_bucket("vmcut")
    cluster, runs = vm_cluster(tmp_path, vm_hosts, s3_server), tmp_path / "runs"
    cmd = [sys.executable, "-m", "launcher", "launch", "digits", *DIGITS, *TWO_NODES, "trainer.epochs=null",
           "trainer.max_steps=4000", "checkpoint.every_steps=100", "checkpoint.uri=s3://vmcut/runs", "--run-name", "cut",
           "--wait", "--cluster", str(cluster), "--runs-dir", str(runs)]
    waiting = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **TEST_CREDENTIALS, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: steps_logged(tmp_path, "cut") >= 3, "step 3", timeout=180, poll=0.05)
    waiting.kill()
    waiting.wait()
    before = steps_logged(tmp_path, "cut")
    wait_until(lambda: steps_logged(tmp_path, "cut") > before + 2, "training to go on without the launcher")
    assert status(cluster, runs, "cut")["state"] == "running"
    out = cli(cluster, runs, "cancel", "cut")
    assert out.returncode == 0 and "sent SIGTERM to the supervisor of run cut" in out.stdout, out.stdout
    final = wait_state(cluster, runs, "cut")
    assert final["state"] == "cancelled", final
    assert final["outcome"] == "preempted" and final["signal"] == "SIGTERM", final
    step = int(final["step"])
    assert 3 < step < 4000  # far from the end: under load, a 400-step run once finished before the cancel landed
    done = cli(cluster, runs, "export", "cut", "--to", str(tmp_path / "cut.pt"))
    assert f"step-{step:09d}" in done.stdout, done.stdout  # the cancel's own checkpoint, from S3


def test_a_node_killed_makes_the_other_exit_and_the_run_resumes(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, straight: Callable[[int], dict]) -> None:
    """Every process of node 1 SIGKILLed (as when its VM vanishes): node 0's ranks do not hang, the failure
    is counted with the node named, the run relaunches and resumes; the final weights are those of a run
    never stopped."""
    s3_server.create_bucket("vmkill")
    cluster, runs = vm_cluster(tmp_path, vm_hosts, s3_server), tmp_path / "runs"
    launch(cluster, runs, "kill", *TWO_NODES, "checkpoint.uri=s3://vmkill/runs")
    wait_until(lambda: steps_logged(tmp_path, "kill") >= 12, "step 12 (one checkpoint)", timeout=180, poll=0.05)
    node1 = str(host_run(tmp_path, HOSTS[1], "kill"))
    subprocess.run(["pkill", "-KILL", "-f", f"run-dir {node1}"], check=False)
    assert wait_state(cluster, runs, "kill")["state"] == "completed"
    info = head_info(tmp_path, "kill")
    assert info["requeues"] == {"failures": 1}, info
    assert "node 127.0.0.3" in info["last_requeue"], info
    assert_bit_equal(exported(cluster, runs, "kill", tmp_path / "kill.pt"), straight(2))
