"""Model-parallel runs (FSDP, pipeline) across VMs that share no folder: each rank sends its own shard to S3,
rank 0 commits the remote folder, and a spot notice ends in a committed checkpoint that VMs with empty
disks resume from (jobs/checkpoint/spread.py). Loopback VMs (scripts/vms_local.sh), a metadata server on
each host's address standing in for GCE, moto's S3, real torchrun ranks; the GPT recipe, shortened."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_cli, wait_until
from metadata_server import MetadataServer
from s3_server import S3Server, s3_server_fixture
from test_vms_runs import HOSTS, REPLACEMENT, assert_bit_equal, cli, exported, head_info, host_run, \
    steps_logged, vm_cluster, wait_state
from test_vms_runs import metadata  # noqa: F401 (the fixture: a metadata server on each host's address)

pytestmark = pytest.mark.slow
s3_server = pytest.fixture(scope="module")(s3_server_fixture)

# 2 VMs x 1 rank; a tiny GPT, 24 steps, saved at the end (and on the notice)
GPT = ["trainer.max_steps=24", "trainer.eval_every=24", "trainer.global_batch=8", "trainer.micro_batch=4",
       "model.kwargs.dim=32", "model.kwargs.layers=2", "model.kwargs.heads=2", "model.kwargs.seq_len=32",
       "data.kwargs.seq_len=32", "data.kwargs.max_bytes=100000", "checkpoint.every_steps=24", "logging.log_every=1"]
LAYOUTS = {"fsdp": ["parallel.strategy=fsdp"],
           "pipeline": ["parallel.strategy=pipeline", "parallel.microbatches=2", "trainer.micro_batch=8",
                        "model.kwargs.tied_embeddings=false"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The same run on one machine with 2 ranks, never stopped: its run folder (made once per layout)."""
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            runs = tmp_path_factory.mktemp("straight")
            run_cli("launch", "gpt_small", *GPT, *LAYOUTS[layout], "--run-name", "s", runs_dir=runs, check=True)
            cache[layout] = runs / "s"
        return cache[layout]
    return get


def losses(run_dir: Path) -> dict[int, float]:
    """Each step's training loss (log_every=1), the last logged for a step that was trained twice."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def gce_cluster(tmp_path: Path, vm_hosts: Path, s3: S3Server, metadata: dict[str, MetadataServer],
                **vms: object) -> tuple[Path, Path]:
    """A cluster config whose hosts are what hosts.txt lists (the test takes VMs away and brings them back)."""
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("\n".join(HOSTS) + "\n")
    cluster = vm_cluster(tmp_path, vm_hosts, s3, hosts=[], hosts_command=f"cat {hosts_file}", provider="gce",
                         metadata_url=f"http://{{host}}:{metadata[HOSTS[0]].port}", **vms)
    return cluster, hosts_file


def resumed_step(folder: Path, bucket: str) -> int:
    logs = "".join(p.read_text() for p in (folder / "hosts").glob("*/runs/mp/logs/rank*.log"))
    resumed = [line for line in logs.splitlines() if f"resumed from s3://{bucket}/runs/mp/step-" in line]
    assert resumed, logs
    return int(resumed[0].split("/step-")[1][:9])


@pytest.mark.parametrize("layout", ["fsdp", "pipeline"])
def test_a_spot_notice_commits_every_ranks_shard_to_s3_and_empty_vms_resume_bit_equal(
        layout: str, tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer],
        straight: Callable[[str], dict]) -> None:
    """A GCE notice on node 1: each rank sends its shard to S3 and rank 0 commits the folder (as at every
    save: the manifest names both ranks' shards). FSDP: node 1 is replaced by a VM with an empty disk and node
    0's checkpoint folder is wiped too, so the ranks resume from S3 alone. Pipeline: the same VMs come back,
    each keeping its own shard and copying the other's. Both end bit-equal to the uninterrupted run;
    `launcher export` reads the final shards from the store."""
    bucket = f"vm{layout}"
    s3_server.create_bucket(bucket)
    cluster, hosts_file = gce_cluster(tmp_path, vm_hosts, s3_server, metadata)
    runs = tmp_path / "runs"
    out = cli(cluster, runs, "launch", "gpt_small", *GPT, *LAYOUTS[layout], "parallel.nodes=2",
              "parallel.procs_per_node=1", f"checkpoint.uri=s3://{bucket}/runs", "--run-name", "mp")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: steps_logged(tmp_path, "mp") >= 3, "step 3", timeout=180, poll=0.05)
    replaced = layout == "fsdp"
    if replaced:
        hosts_file.write_text(f"{HOSTS[0]}\n")
    metadata[HOSTS[1]].notice()
    if replaced:
        wait_until(lambda: head_info(tmp_path, "mp").get("state") == "waiting_for_hosts", "the supervisor to wait")
        shutil.rmtree(host_run(tmp_path, HOSTS[0], "mp") / "checkpoints")  # nothing local is needed to resume
        hosts_file.write_text(f"{HOSTS[0]}\n{REPLACEMENT}\n")
    else:
        wait_until(lambda: head_info(tmp_path, "mp").get("requeues"), "the preemption to be counted")
        metadata[HOSTS[1]].reset()  # the VM came back without a pending notice
    assert wait_state(cluster, runs, "mp")["state"] == "completed"
    assert head_info(tmp_path, "mp")["hosts"] == [HOSTS[0], REPLACEMENT if replaced else HOSTS[1]]
    info = head_info(tmp_path, "mp")
    assert info["requeues"] == {"preemptions": 1}, info
    assert info["notice_to_saved_s"] > 0, info  # measured (how fast: bench/vm_sharded.py)
    step = resumed_step(tmp_path, bucket)
    assert 3 <= step < 24  # the notice's own checkpoint

    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True)
    for saved in (step, 24):  # the notice's and the last, each with both ranks' shards
        manifest = json.loads(fs.cat_file(f"{bucket}/runs/mp/step-{saved:09d}/manifest.json"))
        shards = {name: entry.get("rank") for name, entry in manifest["files"].items() if name.endswith(".distcp")}
        assert shards == {"__0_0.distcp": 0, "__1_0.distcp": 1}, manifest["files"]
    import torch

    assert_bit_equal(exported(cluster, runs, "mp", tmp_path / "mp.pt"),
                     torch.load(straight(layout) / "model.pt", weights_only=True))


def test_fewer_vms_come_back_and_the_run_resumes_on_those_with_the_same_global_batch(
        tmp_path: Path, vm_hosts: Path, s3_server: S3Server, metadata: dict[str, MetadataServer],
        straight: Callable[[str], Path]) -> None:
    """vms.min_nodes=1: node 1 is preempted and never returns within vms.host_wait_s, so the FSDP run resumes
    on node 0 alone: DCP reshards the 2 ranks' checkpoint into one, the global batch is kept by accumulating 2
    micro-batches per step, and the next step's loss is the uninterrupted 2-VM run's within 1e-5. The change
    of size is a line in the logs and counted in `launcher status`."""
    s3_server.create_bucket("vmshrink")
    cluster, hosts_file = gce_cluster(tmp_path, vm_hosts, s3_server, metadata, min_nodes=1, host_wait_s=2)
    runs = tmp_path / "runs"
    out = cli(cluster, runs, "launch", "gpt_small", *GPT, *LAYOUTS["fsdp"], "parallel.nodes=2",
              "parallel.procs_per_node=1", "checkpoint.uri=s3://vmshrink/runs", "--run-name", "mp")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: steps_logged(tmp_path, "mp") >= 3, "step 3", timeout=180, poll=0.05)
    hosts_file.write_text(f"{HOSTS[0]}\n")
    metadata[HOSTS[1]].notice()
    final = wait_state(cluster, runs, "mp")
    assert final["state"] == "completed" and final["nodes"] == "1 of 2 (resized 1x)", final
    step = resumed_step(tmp_path, "vmshrink")
    node0 = host_run(tmp_path, HOSTS[0], "mp")
    log = (node0 / "logs" / "rank0.log").read_text()
    assert "the run resumes on 1 of its 2 VMs (vms.min_nodes=1)" in log, log
    assert "running on 1 of the recipe's 2 nodes: 2 micro-batches per replica and step instead of 1; the " \
           "global batch stays 8" in log, log
    assert "written by fsdp on 2 ranks, resumed as single on 1: resharded by DCP" in log, log
    assert "config changed" not in log  # the node count is not the config
    mine, theirs = losses(node0), losses(straight("fsdp"))
    assert abs(mine[step + 1] - theirs[step + 1]) < 1e-5, (step, mine, theirs)
    assert mine[24] == pytest.approx(theirs[24], rel=1e-3)  # the same training, summed in another order
