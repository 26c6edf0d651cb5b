"""Bayesian sweeps on VMs: the loopback "VMs" of scripts/vms_local.sh, moto's S3 holding the study and the trials'
checkpoints, metadata servers on the hosts' addresses for spot notices (as tests/test_vms_runs.py). The refusals
that remain are pure: one line, exit 2, nothing started or written (grid and random sweeps, refused after the
hosts were checked: tests/test_vms_ssh.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import run_cli, wait_until
from metadata_server import MetadataServer
from s3_server import S3Server, TEST_CREDENTIALS, free_port, s3_server_fixture
from test_vms_runs import HOSTS, REPLACEMENT, host_run, vm_cluster

s3_server = pytest.fixture(scope="module")(s3_server_fixture)

SWEEP = ["--search", "bayes", "--param", "optim.lr=loguniform:2e-2:2e-1", "--trials", "3", "--name", "vs"]
# small and short: 1 rank per VM, an evaluation at steps 15 and 30 (the metric the study is told), a checkpoint
# every 5 steps
TRIAL = ["parallel.procs_per_node=1", "trainer.max_steps=30", "trainer.eval_every=15", "checkpoint.every_steps=5",
         "trainer.micro_batch=16", "logging.log_every=1"]


@pytest.fixture
def metadata() -> Iterator[dict[str, MetadataServer]]:
    port = free_port()
    servers = {host: MetadataServer(host, port) for host in [*HOSTS, REPLACEMENT]}
    for server in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def trial_steps(folder: Path) -> dict[tuple[str, str], int]:
    """(host, trial) -> the highest step its rank 0 logged there."""
    out = {}
    for path in (folder / "hosts").glob("*/runs/vs-t*/metrics.jsonl"):
        lines = [json.loads(x) for x in path.read_text().split("\n")[:-1] if x.strip()]
        out[(path.parents[2].name, path.parent.name)] = max([x.get("step", 0) for x in lines] or [0])
    return out


@pytest.mark.slow
def test_a_sweep_on_two_vms_resumes_a_preempted_trial_as_the_same_trial(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer]) -> None:
    """3 trials, 2 workers on node 0, one VM each; an AWS spot notice on node 1 mid-trial, and node 1 is replaced
    by a VM with another address and an empty disk: the trial's supervisor (on node 0) relaunches it there and it
    resumes from its checkpoint in S3, as the same trial. `launcher sweep` returns once the workers run (they need
    this machine no more); sweep-status reads the study from S3."""
    s3_server.create_bucket("vmsweep")
    pool = tmp_path / "hosts.txt"
    pool.write_text("\n".join(HOSTS) + "\n")
    cluster = vm_cluster(tmp_path, vm_hosts, s3_server, hosts=[], hosts_command=f"cat {pool}", provider="aws",
                         notice_poll_s=0.2, metadata_url=f"http://{{host}}:{metadata[HOSTS[0]].port}")
    runs = tmp_path / "runs"
    out = run_cli("sweep", "digits", *SWEEP, "--workers", "2", *TRIAL, "checkpoint.uri=s3://vmsweep/runs",
                  "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "study s3://vmsweep/runs/sweeps/vs/study" in out.stdout, out.stdout
    assert "2 workers started on 127.0.0.2" in out.stdout, out.stdout
    trial = wait_until(lambda: next((t for (h, t), step in trial_steps(tmp_path).items() if h == HOSTS[1] and step >= 4),
                                    None), "a trial on node 1 to reach step 4", timeout=180, poll=0.05)
    pool.write_text(f"{HOSTS[0]}\n")  # node 1 is taken away...
    metadata[HOSTS[1]].notice()  # ...after its notice
    record = host_run(tmp_path, HOSTS[0], trial) / "run.json"  # the trial's supervisor runs on node 0
    wait_until(lambda: json.loads(record.read_text()).get("state") == "waiting_for_hosts", "the supervisor to wait")
    pool.write_text(f"{HOSTS[0]}\n{REPLACEMENT}\n")  # the replacement VM

    def finished() -> str:
        done = run_cli("sweep-status", "vs", "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout if "3 of 3 trials: 3 completed" in done.stdout else ""
    status = wait_until(finished, "3 completed trials", timeout=240, poll=2.0)
    rows = [line for line in status.splitlines() if re.match(r"vs-t0[0-2] ", line)]
    assert len(rows) == 3 and all(" completed " in r for r in rows), status
    best = re.search(r"best trial: (vs-t0[0-2]) \(#\d\) val/acc (\d\.\d+)", status)
    assert best, status
    assert rows[0].startswith(best[1]) and best[2] in rows[0], status  # the table, best first, from the study
    info = json.loads(record.read_text())
    assert info["requeues"] == {"preemptions": 1} and info["state"] == "completed", info
    assert info["hosts"] == [REPLACEMENT], info
    log = (host_run(tmp_path, REPLACEMENT, trial) / "logs" / "rank0.log").read_text()
    assert f"resumed from s3://vmsweep/runs/{trial}/step-" in log, log[-2000:]
    assert not list(runs.glob("vs-t*"))  # the workers' records of the trials are on node 0, not here


def refused(tmp_path: Path, cluster: Path, *args: str) -> str:
    runs = tmp_path / "runs"
    out = run_cli("sweep", "digits", *SWEEP, *args, "--cluster", str(cluster), runs_dir=runs, env=TEST_CREDENTIALS)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) <= 2, out.stderr  # + a HINT
    assert not runs.exists() or not any(runs.rglob("*")), list(runs.rglob("*"))
    return out.stderr


def unreachable_cluster(tmp_path: Path) -> Path:
    """VMs that do not exist (port 9 on loopback): a refusal that reached a host would say so instead."""
    path = tmp_path / "vms.yaml"
    path.write_text(yaml.safe_dump({"backend": "vms", "vms": {"hosts": ["127.0.0.9", "127.0.0.10"], "port": 9,
                                                             "known_hosts": "ignore", "connect_timeout_s": 2}}))
    return path


def test_a_sweep_on_vms_without_an_object_store_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, unreachable_cluster(tmp_path), "parallel.procs_per_node=1")
    assert "a sweep on VMs keeps its study and its trials' checkpoints in an object store" in err, err
    assert "checkpoint.uri=s3://" in err


def test_more_workers_than_slots_of_vms_are_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, unreachable_cluster(tmp_path), "--workers", "3", "parallel.procs_per_node=1",
                  "checkpoint.uri=s3://b/p")
    assert "--workers 3 of parallel.nodes=1 need 3 VMs" in err and "vms.hosts lists 2" in err, err
    assert "use --workers 2" in err


def test_the_new_vms_keys_are_checked_at_load_and_shown(tmp_path: Path) -> None:
    """vms.supervisor_host (where a run's supervisor runs) and vms.host_offset (a slot of the pool): refused at load
    when bad, naming the key; shown by `launcher show`."""
    path = tmp_path / "c.yaml"
    for key, value in (("supervisor_host", "10.0.0.9; rm -rf /"), ("host_offset", -1)):
        path.write_text(yaml.safe_dump({"backend": "vms", "vms": {"hosts": ["10.0.0.2"], key: value}}))
        out = run_cli("show", "digits", "--cluster", str(path))
        assert out.returncode == 2 and f"vms.{key}" in out.stderr, out.stdout + out.stderr
    path.write_text(yaml.safe_dump({"backend": "vms", "vms": {"hosts": ["10.0.0.2", "10.0.0.3"],
                                                             "supervisor_host": "10.0.0.9", "host_offset": 1}}))
    out = run_cli("show", "digits", "--cluster", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "supervisor_host: 10.0.0.9" in out.stdout and "host_offset: 1" in out.stdout, out.stdout


def test_a_slot_of_the_pool_is_the_hosts_from_its_offset() -> None:
    from jobs.schema.errors import ConfigError
    from jobs.schema.vms import VmsConfig
    from launcher.vms.hosts import resolve_hosts

    pool = ("10.0.0.2", "10.0.0.3", "10.0.0.4")
    assert resolve_hosts(VmsConfig(hosts=pool), "c", 2) == ["10.0.0.2", "10.0.0.3"]
    assert resolve_hosts(VmsConfig(hosts=pool, host_offset=1), "c", 2) == ["10.0.0.3", "10.0.0.4"]
    with pytest.raises(ConfigError, match="parallel.nodes=2 from vms.host_offset=2 on but vms.hosts lists 3"):
        resolve_hosts(VmsConfig(hosts=pool, host_offset=2), "c", 2)
