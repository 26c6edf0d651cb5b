"""`launcher doctor` (issue #12, point 3): each diagnosis from a real failing run on this machine's CPU, or from
a recorded run directory (tests/golden/doctor/) for what only happens on GPUs, on Slurm or on a broken disk:
the recorded logs quote torch's, NCCL's, gloo's and botocore's own messages. store_down and disk_full are
recordings of real runs here (the S3 server stopped mid-run; a 600 KiB tmpfs as the runs directory).
Without a run: the environment checks against real local things (the moto S3 server, a port nothing listens on).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli, user_cli
from launcher.doctor.diagnose import diagnose
from launcher.doctor.ranks import first_stop
from launcher.doctor.findings import exit_code
from launcher.doctor.records import read_run
from s3_server import free_port, s3_server_fixture
from jobs.schema.run_dir import Run

GOLDEN = REPO / "tests" / "golden" / "doctor"

s3_server = pytest.fixture(scope="module")(s3_server_fixture)


def findings_of(name: str, root: Path = GOLDEN) -> list:
    return diagnose(read_run(Run(name, root / name)))


# ----------------------------------------------------------------------------- recorded runs
# case -> texts the one failure finding must hold (what happened, the numbers, the fix) and its evidence file:line
RECORDED = {
    "cuda_oom": (["out of memory on the GPU on rank 1", "tried to allocate 3.06 GiB",
                  "micro batch 64 x 1 accumulation x 2 ranks = global batch 128", "trainer.micro_batch=auto",
                  "micro batch 32 x 2 accumulation", "per-rank batch 64 below 64 (32, 16, 8, 4, 2, 1)",
                  "trainer.precision=bf16"], ["logs/rank1.log:2", "logs/rank0.log:4"]),
    "cuda_label_assert": (["CUDA device-side assert on rank 0", "label outside 0..num_classes-1",
                           "model.num_classes=5, so labels must be 0..4", "set model.num_classes"],
                          ["logs/rank0.log:5", "slurm-5311.out:1"]),
    "cudnn_not_initialized": (["CUDNN_STATUS_NOT_INITIALIZED", "on rank 0", "nvidia-smi",
                               "torch.backends.cudnn.version()"], ["logs/rank0.log:4"]),
    "nccl_timeout": (["NCCL ALLREDUCE (collective number 808) timed out after 600 s", "rank 1 never reached it",
                      "rank 1 was killed or hung"], ["slurm-4127.out:1", "logs/rank1.log:1"]),
    "gloo_timeout": (["gloo recv timed out on rank 0 after 600 s", "rank 1 never reached it"],
                     ["logs/rank0.log:6", "logs/rank1.log:1"]),
    "port_in_use": (["rendezvous port 27342 was already in use on rank 0", "ss -ltnp | grep :27342"],
                    ["logs/rank0.log:3"]),
    "disk_full": (["the disk was full on rank 0 in /tmp/dr/full/diskfull/checkpoints (2 times)",
                   "checkpoint.keep_last=2 now"], ["logs/rank0.log:9", "logs/rank0.log:12"]),
    "store_down": (["checkpoint store at http://127.0.0.1:55173 could not be reached on rank 0",
                    "4 failed uploads", "not uploaded to s3://ckpt/runs", "storage.endpoint_url"],
                   ["logs/rank0.log:19", "logs/rank0.log:24"]),
    "slurm_requeues": (["2 preemptions, 3 timeouts", "timeouts limit of 3 reached (slurm.max_timeouts)",
                        "raise slurm.time_min (now 30 min)"], []),
}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_recorded_failure_is_named_with_its_evidence_and_fix(case: str) -> None:
    texts, evidence = RECORDED[case]
    failures = [f for f in findings_of(case) if f.failure]
    assert len(failures) == 1, failures  # one cause, not a finding per symptom
    said = f"{failures[0].what} FIX: {failures[0].fix}"
    for text in texts:
        assert text in said, f"{text!r} not in {said!r}"
    assert [line.where for line in failures[0].evidence] == evidence
    assert exit_code(failures) == 1


def test_recorded_nccl_timeout_through_the_cli() -> None:
    proc = run_cli("doctor", "nccl_timeout", runs_dir=GOLDEN)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FAILURE: an NCCL ALLREDUCE") and "  slurm-4127.out:1: [rank0]:" in proc.stdout
    assert "FIX: rank 1 was killed or hung" in proc.stdout


def test_a_preempted_run_that_resumes_is_a_note_not_a_failure(tmp_path: Path) -> None:
    run = tmp_path / "stopped"
    (run / "logs").mkdir(parents=True)
    Run("stopped", run).update(run_name="stopped", state="preempted")
    (run / "result.json").write_text('{"outcome": "preempted", "step": 40, "signal": "SIGTERM"}')
    found = findings_of("stopped", tmp_path)
    assert [(f.failure, f.what) for f in found] == [
        (False, "the run was stopped by SIGTERM at step 40 after saving a checkpoint")]
    assert exit_code(found) == 0


# ----------------------------------------------------------------------------- real failing runs
FAULTY = '''\
"""A digits classifier that fails on purpose, on one rank, at one forward call."""
import os
import signal

import torch
from torch import nn


class Faulty(nn.Module):
    def __init__(self, fault: str, rank: int, at_call: int) -> None:
        super().__init__()
        self.fault, self.rank, self.at_call, self.calls = fault, rank, at_call, 0
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.training and int(os.environ.get("RANK", "0")) == self.rank and self.calls >= self.at_call:
            if self.fault == "kill":  # as the kernel's out-of-memory killer does
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fault == "oom":  # activations far too large for memory: 2**44 bytes per sample
                torch.empty(x.shape[0] << 44, dtype=torch.uint8)
        return self.body(x)


def faulty(fault: str, rank: int, at_call: int = 3) -> nn.Module:
    return Faulty(fault, rank, at_call)
'''
RECIPE = {"model": {"target": "faulty:faulty", "kwargs": {"fault": "kill", "rank": 1}, "image_size": 8,
                    "in_channels": 1},
          "data": {"name": "digits", "val_fraction": 0.2}, "optim": {"name": "sgd", "lr": 0.1},
          "trainer": {"max_steps": 6, "global_batch": 64, "micro_batch": 16},
          "parallel": {"procs_per_node": 2}, "logging": {"tracker": "none", "log_every": 1}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faulty")
    (folder / "faulty.py").write_text(FAULTY)
    (folder / "faulty.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder


def _failed_launch(project: Path, runs: Path, name: str, *overrides: str) -> None:
    proc = user_cli(project, "launch", "faulty.yaml", *overrides, "--run-name", name, "--runs-dir", str(runs))
    assert proc.returncode != 0, proc.stdout[-2000:]


def _doctor(project: Path, runs: Path, name: str) -> tuple[int, str]:
    proc = user_cli(project, "doctor", name, "--runs-dir", str(runs))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def test_real_cpu_out_of_memory_names_the_batch_and_what_auto_would_do(project: Path, runs_dir: Path) -> None:
    _failed_launch(project, runs_dir, "oom", "model.kwargs.fault=oom", "model.kwargs.rank=0")
    code, out = _doctor(project, runs_dir, "oom")
    assert code == 1, out
    assert out.startswith("FAILURE: out of memory on the CPU (host memory) on rank 0: tried to allocate 256.00 TiB")
    assert "micro batch 16 x 2 accumulation x 2 ranks = global batch 64" in out
    assert "trainer.micro_batch=auto: it tries micro batch 16 and smaller and keeps the global batch 64" in out
    assert "a divisor of the per-rank batch 32 below 16 (8, 4, 2, 1)" in out
    assert "DefaultCPUAllocator" in out and "logs/rank0.log:" in out  # torch's own line, quoted with file:line
    assert out.count("FAILURE") == 1  # rank 1's lost connection is a consequence, not a second diagnosis


def test_real_killed_rank_is_named_as_the_one_that_stopped_first(project: Path, runs_dir: Path) -> None:
    _failed_launch(project, runs_dir, "killed", "model.kwargs.fault=kill", "model.kwargs.rank=1")
    code, out = _doctor(project, runs_dir, "killed")
    assert code == 1, out
    assert out.startswith("FAILURE: rank 1 stopped first: its log ends (logs/rank1.log:1) without an error, and "
                          "then rank 0 lost its connection to it"), out
    assert "by peer" in out and "FIX: rank 1 was killed or hung" in out


def test_real_label_out_of_range_then_a_fixed_relaunch_is_clean(runs_dir: Path) -> None:
    """digits has 10 classes: with model.num_classes=5, cross_entropy on the CPU raises IndexError (on a GPU,
    the device-side assert of the recorded case). The same run launched again with the right value
    completes: only the last launch's logs count, though the old error is still in them."""
    bad = run_cli("launch", "digits", "model.num_classes=5", "trainer.max_steps=3", "--run-name", "labels",
                  runs_dir=runs_dir)
    assert bad.returncode != 0
    proc = run_cli("doctor", "labels", runs_dir=runs_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "a label outside the classifier's range on rank" in proc.stdout
    assert "with model.num_classes=5, so labels must be 0..4" in proc.stdout
    target = int(proc.stdout.split("target ", 1)[1].split()[0])
    assert 5 <= target <= 9 and f"(at least {target + 1})" in proc.stdout
    good = run_cli("launch", "digits", "trainer.max_steps=2", "--run-name", "labels", runs_dir=runs_dir)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert "IndexError" in (runs_dir / "labels" / "logs" / "rank0.log").read_text()
    proc = run_cli("doctor", "labels", runs_dir=runs_dir)
    assert (proc.returncode, proc.stdout) == (0, "run labels: nothing wrong found in its logs and records\n")


def test_first_stop_prefers_a_rank_with_an_error_of_its_own(runs_dir: Path) -> None:
    """first_stop on a hand-made pair of logs: the rank that lost its peer is not the one that stopped first."""
    run = runs_dir / "pair"
    (run / "logs").mkdir(parents=True)
    Run("pair", run).update(run_name="pair", state="failed")
    (run / "logs" / "rank0.log").write_text(
        "10:00:00 [rank0] INFO jobs.train: rank 0 of 2 on vm (local rank 0), run x\n"
        "10:00:05 [rank0] ERROR jobs.train: rank failed: RuntimeError: [pair.cc:553] Connection closed by peer\n")
    (run / "logs" / "rank1.log").write_text(
        "10:00:00 [rank1] INFO jobs.train: rank 1 of 2 on vm (local rank 1), run x\n"
        "10:00:05 [rank1] ERROR jobs.train: rank failed: ValueError: bad batch\n")
    first = first_stop(read_run(Run("pair", run)))
    assert first is not None and (first.ranks, first.how) == ((1,), "error")


def test_unknown_run_is_one_line_and_exit_2(runs_dir: Path) -> None:
    proc = run_cli("doctor", "no-such-run", runs_dir=runs_dir)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "no such run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the environment
def _cluster(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), **config}))
    return str(path)


def test_environment_on_this_cpu_machine_is_fine_and_hides_the_wandb_key(tmp_path: Path) -> None:
    proc = run_cli("doctor", "--cluster", _cluster(tmp_path, {"backend": "local"}),
                   env={"WANDB_API_KEY": "key-abc123-do-not-print", "WANDB_MODE": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ok   torch: torch 2.")
    assert any(line.startswith("info GPUs: ") for line in lines)  # absent GPUs: information, not a failure
    assert "FAIL" not in proc.stdout and "key-abc123" not in proc.stdout
    assert "WANDB_API_KEY is set)" in proc.stdout or "wandb is not installed" in proc.stdout


def test_store_reachable_and_unreachable(tmp_path: Path, s3_server) -> None:  # noqa: ANN001 - the S3Server
    s3_server.create_bucket("doctor-bucket")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    up = _cluster(tmp_path, {"backend": "local", "storage": {"endpoint_url": s3_server.endpoint}})
    proc = run_cli("doctor", "--cluster", up, "--store", "s3://doctor-bucket/ckpt", env=creds)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   checkpoint store: s3://doctor-bucket/ckpt answers" in proc.stdout
    down = _cluster(tmp_path, {"backend": "local", "storage": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}})
    proc = run_cli("doctor", "--cluster", down, "--store", "s3://doctor-bucket/ckpt", env=creds)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL checkpoint store: s3://doctor-bucket/ckpt: cannot be listed" in proc.stdout
    assert "Could not connect to the endpoint URL" in proc.stdout and "storage.endpoint_url" in proc.stdout


def test_vm_host_not_listening_fails(tmp_path: Path) -> None:
    port = free_port()
    cluster = _cluster(tmp_path, {"backend": "vms", "vms": {"hosts": ["127.0.0.1"], "port": port, "user": "nobody",
                                                            "known_hosts": "ignore"}})
    proc = run_cli("doctor", "--cluster", cluster)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL VM nobody@127.0.0.1:{port}: " in proc.stdout and "connection refused" in proc.stdout


def test_slurm_commands_missing_from_path_fail(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, {"backend": "slurm", "slurm": {"partition": "debug"}})
    proc = run_cli("doctor", "--cluster", cluster, env={"PATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL Slurm: not on PATH: sbatch, srun, squeue, sacct, scontrol, scancel" in proc.stdout
