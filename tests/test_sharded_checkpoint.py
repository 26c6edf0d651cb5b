"""Sharded checkpoints (jobs/checkpoint/sharded.py): FSDP and pipeline runs save each rank's shard with
DCP under one manifest. Real 2-rank runs (torchrun, gloo): what a committed folder holds, a missing or
altered shard invalidates the checkpoint, a rank SIGKILLed mid-save leaves the previous checkpoint in
charge, export writes a plain state dict, a pipeline stopped by SIGTERM resumes bit-exactly, and the
shards go through the S3 server (moto) and back to a run directory that has only the remote copy."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import REPO, final_params, launch_until_step, read_result, run_cli
from jobs.checkpoint import Checkpointer
from s3_server import TEST_CREDENTIALS, S3Server, s3_cluster
from jobs.schema import CheckpointConfig, StorageConfig

FSDP = ["parallel.strategy=fsdp", "parallel.procs_per_node=2", "logging.progress_bar=false"]
SHARDS = {".metadata", "__0_0.distcp", "__1_0.distcp"}


def _launch(runs_dir: Path, name: str, *overrides: str, recipe: str = "digits", **kw: object) -> Path:
    run_cli("launch", recipe, *overrides, "--run-name", name, runs_dir=runs_dir, check=True, timeout=300, **kw)
    return runs_dir / name


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits on 2 FSDP ranks, checkpoints at steps 2, 4 and 6 (shared: the tests below only read it
    or work on copies; the S3 test compares its resumed run with it)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    return _launch(runs_dir, "sharded", *FSDP, "trainer.max_steps=6", "checkpoint.every_steps=2",
                   "checkpoint.keep_last=3")


def test_a_sharded_checkpoint_is_every_ranks_shard_under_one_manifest(fsdp_run: Path) -> None:
    """No rank gathers the model: each wrote its own shard, rank 0 its small files and DCP's index,
    and the manifest names who wrote what, with sizes and hashes that match the files."""
    folder = fsdp_run / "checkpoints" / "step-000000006"
    files = _manifest(folder)["files"]
    assert set(files) == SHARDS | {"trainer.pt", "scheduler.pt", "rng.pt", "meta.pt"}  # no model.pt, optimizer.pt
    assert {f: files[f].get("rank") for f in SHARDS} == {".metadata": 0, "__0_0.distcp": 0, "__1_0.distcp": 1}
    assert all((folder / f).stat().st_size == e["size"] for f, e in files.items())
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert meta["layout"] == {"strategy": "fsdp", "world_size": 2, "sharded": True}


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def _checkpointer(run: Path) -> Checkpointer:
    return Checkpointer(CheckpointConfig(), run / "checkpoints", None, StorageConfig(), is_writer=False)


def test_a_missing_or_altered_shard_makes_the_checkpoint_invalid(fsdp_run: Path, tmp_path: Path) -> None:
    run = _copy_run(fsdp_run, tmp_path)
    ckpts = run / "checkpoints"
    assert _checkpointer(run).latest() == str(ckpts / "step-000000006")
    (ckpts / "step-000000006" / "__0_0.distcp").unlink()  # a shard lost
    assert _checkpointer(run).latest() == str(ckpts / "step-000000004")
    shard = ckpts / "step-000000004" / "__1_0.distcp"  # a shard altered, its size unchanged
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    loaded = _checkpointer(run).load_latest()  # checks every shard's hash as it loads
    assert loaded is not None and loaded[0] == str(ckpts / "step-000000002")
    assert loaded[1]["trainer"]["step"] == 2


def test_export_of_a_sharded_run_is_the_plain_state_dict_of_a_ddp_run(fsdp_run: Path, tmp_path: Path) -> None:
    """The shards' model, read whole without a process group, under the names a DDP run exports."""
    out = tmp_path / "sharded.pt"
    proc = run_cli("export", "sharded", "--to", str(out), runs_dir=fsdp_run.parent, check=True)
    assert "step-000000006" in proc.stdout and "Warning" not in proc.stderr
    exported = torch.load(out, weights_only=True)
    final = final_params(fsdp_run)  # the completed run's model.pt: the same step, gathered
    assert list(exported) == list(final) and all(torch.equal(exported[k], final[k]) for k in final)
    ddp = _launch(tmp_path, "ddp", "trainer.max_steps=1", "checkpoint.every_steps=1", "logging.progress_bar=false")
    run_cli("export", "ddp", "--to", str(tmp_path / "ddp.pt"), runs_dir=tmp_path, check=True)
    assert list(torch.load(tmp_path / "ddp.pt", weights_only=True)) == list(exported)
    assert "shard" not in json.dumps(_manifest(ddp / "checkpoints" / "step-000000001"))  # DDP: whole files


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """Rank 1 SIGKILLed while its shard of step 2 is written: step 2 is never committed, and the next
    launch resumes from step 1 on both ranks (each reads its own shard of step 1)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = [str(REPO / "tests" / "shard_writer.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*torchrun, *script, "save", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WRITING"):
            os.kill(int(line.split()[1]), signal.SIGKILL)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert "COMMITTED 1" in out and proc.returncode != 0, out
    assert (tmp_path / "step-000000002").is_dir() and not (tmp_path / "step-000000002" / "manifest.json").exists()

    resumed = subprocess.run([*torchrun, *script, "resume", str(tmp_path)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "RESUMED 1 0 10.0" in resumed.stdout and "RESUMED 1 1 11.0" in resumed.stdout, resumed.stdout


def test_a_rank_that_cannot_write_its_shard_costs_that_save_not_the_run(tmp_path: Path) -> None:
    """Rank 1's write of step 2 fails (a directory where its file goes): step 2 is not committed and
    flush() says nothing was; the next save (step 3) commits and flush() says so."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, str(REPO / "tests" / "shard_writer.py"), "fail", str(tmp_path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FLUSHED")]
    assert lines == ["FLUSHED False LATEST None", f"FLUSHED True LATEST {tmp_path / 'step-000000003'}"], proc.stdout
    assert "checkpoint step 2 NOT saved" in proc.stderr


# gpt_small shrunk hard, dropout on (the RNG streams of both stages are restored too)
PIPE = ["model.kwargs.dim=32", "model.kwargs.layers=2", "model.kwargs.seq_len=32", "model.kwargs.dropout=0.1",
        "model.kwargs.tied_embeddings=false", "data.kwargs.seq_len=32", "data.kwargs.max_bytes=20000",
        "trainer.global_batch=8", "trainer.micro_batch=8", "trainer.eval_every=0", "trainer.max_steps=16",
        "checkpoint.every_steps=3", "parallel.strategy=pipeline", "parallel.procs_per_node=2",
        "parallel.microbatches=2", "parallel.pipeline_schedule=1f1b", "logging.progress_bar=false",
        "logging.log_every=1"]


@pytest.mark.slow
def test_pipeline_stopped_by_sigterm_and_relaunched_equals_uninterrupted(runs_dir: Path) -> None:
    """2 stages (1F1B) stopped by SIGTERM at a drawn step save their shards; the relaunch loads them
    and ends bit-equal to an uninterrupted run."""
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-pipeline").randint(4, 11)
    print(f"stopping near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    proc = launch_until_step("gpt_small", PIPE, runs_dir, "cut", target)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    stopped = read_result(runs_dir / "cut")
    assert stopped["outcome"] == "preempted" and stopped["step"] < 16 and stopped["checkpoints_committed"], out
    saved = runs_dir / "cut" / "checkpoints" / f"step-{stopped['step']:09d}"
    assert SHARDS <= set(_manifest(saved)["files"])

    again = run_cli("launch", "gpt_small", *PIPE, "--run-name", "cut", runs_dir=runs_dir, check=True)
    assert f": step {stopped['step']}, epoch" in again.stdout
    _launch(runs_dir, "straight", *PIPE, recipe="gpt_small")
    straight, cut = final_params(runs_dir / "straight"), final_params(runs_dir / "cut")
    assert list(straight) == list(cut)
    assert all(torch.equal(straight[k], cut[k]) for k in straight), "resumed pipeline differs from uninterrupted"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[S3Server, Path]]:
    yield from s3_cluster(tmp_path, "ckpts")


@pytest.mark.slow
def test_sharded_checkpoints_through_s3_resume_where_only_the_remote_copy_is(s3: tuple[S3Server, Path],
                                                                            tmp_path: Path, fsdp_run: Path) -> None:
    """The shards and DCP's index go up with the manifest last; a run directory without its local copies
    (another machine) downloads them, checks them and resumes; the result equals an uninterrupted run's."""
    server, cluster = s3
    base = [*FSDP, "checkpoint.uri=s3://ckpts/runs", "checkpoint.every_steps=2", "--cluster", str(cluster)]
    # synchronous saves here (the other tests save asynchronously): each rank writes on the training thread
    first = _launch(tmp_path / "a", "run", *base, "trainer.max_steps=4", "checkpoint.async_save=false",
                    env=TEST_CREDENTIALS)
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True)
    remote = {p.rsplit("/", 1)[-1] for p in fs.find("ckpts/runs/run/step-000000004")}
    assert remote == set(_manifest(first / "checkpoints" / "step-000000004")["files"]) | {"manifest.json"}

    shutil.rmtree(first / "checkpoints")  # a new machine: the run directory has no local copy
    fresh = _launch(tmp_path / "a", "run", *base, "trainer.max_steps=6", env=TEST_CREDENTIALS)
    log = (fresh / "logs" / "rank0.log").read_text()
    assert "downloading sharded checkpoint s3://ckpts/runs/run/step-000000004" in log, log
    assert ": step 4, epoch 0" in log
    # the uninterrupted run: fsdp_run has the same recipe, steps and saves (it keeps more, which trains the same)
    a, b = final_params(fresh), final_params(fsdp_run)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from S3 differs from uninterrupted"
