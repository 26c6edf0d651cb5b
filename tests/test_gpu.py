"""Tier 3: the same runs on CUDA/NCCL. Skipped, with the reason, where no GPU is present (CI)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import final_params, read_result, run_cli
from jobs.training.peaks import gpu_peak

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ONE_GPU = ["parallel.procs_per_node=1", "trainer.global_batch=32"]
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # what a CPU-only machine shows the job


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_single_gpu_run(precision: str, runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "parallel.procs_per_node=1", "trainer.global_batch=32",
                   "trainer.device=cuda", f"trainer.precision={precision}", "--run-name", precision,
                   runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device cuda:0 (requested)" in proc.stdout
    assert read_result(runs_dir / precision)["val/acc"] >= 0.9
    # the rates on CUDA: the allocator's peak, and an MFU against the data sheet's peak where the GPU is known
    rows = [json.loads(x) for x in (runs_dir / precision / "metrics.jsonl").read_text().splitlines()]
    rated = [r for r in rows if "samples_per_s" in r]
    assert rated and all(r["peak_mem_gb"] > 0 and "peak_rss_gb" not in r for r in rated), rated
    if gpu_peak(torch.cuda.get_device_name(0), precision, tf32=False) is not None:
        assert all(0 < r["mfu"] <= 1 for r in rated), rated


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL")
def test_two_gpu_nccl_run(runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "trainer.device=cuda", "--run-name", "nccl", runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process group: nccl, 2 ranks" in proc.stdout


def test_gpu_checkpoint_resumes_on_cpu(runs_dir: Path) -> None:
    """A run trained on CUDA, relaunched where no GPU is visible with trainer.device=cpu, loads the CUDA
    checkpoint onto the CPU (map_location) and carries on from exactly the state it was saved in."""
    steps = ["trainer.epochs=null", "checkpoint.every_steps=3", "logging.log_every=1", "logging.progress_bar=false"]
    run_dir = runs_dir / "g"
    run_cli("launch", "digits", *ONE_GPU, *steps, "trainer.max_steps=6", "trainer.device=cuda", "--run-name", "g",
            runs_dir=runs_dir, check=True)
    on_gpu = final_params(run_dir)
    (run_dir / "model.pt").unlink()  # from here on, model.pt is written by the CPU runs

    # Relaunched for the same 6 steps there is nothing left to train: model.pt is the state it loaded.
    same = run_cli("launch", "digits", *ONE_GPU, *steps, "trainer.max_steps=6", "trainer.device=cpu",
                   "--run-name", "g", runs_dir=runs_dir, env=NO_GPU, check=True)
    assert "device cpu (requested)" in same.stdout and re.search(r"resumed from \S+: step 6, ", same.stdout), \
        same.stdout
    on_cpu = final_params(run_dir)
    assert on_gpu.keys() == on_cpu.keys()
    for key in on_gpu:
        assert torch.equal(on_gpu[key], on_cpu[key]), f"{key} changed between the GPU save and the CPU load"

    # Relaunched for 12 steps it trains steps 7-12 on the CPU, not 1-12 again.
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    more = run_cli("launch", "digits", *ONE_GPU, *steps, "trainer.max_steps=12", "trainer.device=cpu",
                   "--run-name", "g", runs_dir=runs_dir, env=NO_GPU, check=True)
    assert re.search(r"resumed from \S+: step 6, ", more.stdout), more.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[logged:]]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(7, 13)), lines
    assert read_result(run_dir)["outcome"] == "completed" and read_result(run_dir)["step"] == 12
    trained = final_params(run_dir)
    assert any(not torch.equal(on_cpu[key], trained[key]) for key in on_cpu)  # it did train on


def test_cuda_run_is_not_moved_to_cpu_silently_and_exports_on_cpu(runs_dir: Path, tmp_path: Path) -> None:
    """trainer.device=cuda on a machine without a visible GPU fails instead of training on the CPU;
    the weights of the GPU run export to CPU tensors there."""
    run_cli("launch", "digits", *ONE_GPU, "trainer.device=cuda", "trainer.epochs=2", "--run-name", "g",
            runs_dir=runs_dir, check=True)
    proc = run_cli("launch", "digits", *ONE_GPU, "trainer.device=cuda", "trainer.epochs=2", "--run-name", "g",
                   runs_dir=runs_dir, env=NO_GPU)
    assert proc.returncode != 0 and "no CUDA device" in proc.stdout + proc.stderr  # device=cuda is not silently CPU
    out = tmp_path / "w.pt"
    run_cli("export", "g", "--to", str(out), runs_dir=runs_dir, env=NO_GPU, check=True)
    assert all(t.device.type == "cpu" for t in torch.load(out, weights_only=True).values())


GPT_FSDP = ["model.kwargs.dim=128", "model.kwargs.layers=4", "trainer.device=cuda", "trainer.max_steps=6",
            "checkpoint.every_steps=3", "parallel.strategy=fsdp", "logging.progress_bar=false"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for FSDP over NCCL")
def test_fsdp_bf16_mixed_precision_over_nccl_saves_shards_that_resume_on_one_gpu(runs_dir: Path) -> None:
    """FSDP2 with bf16 parameters and fp32 reductions on 2 GPUs writes a sharded checkpoint (a shard per
    rank, pinned host staging); the same run resumed on one GPU reshards it and carries on."""
    run_cli("launch", "gpt_small", *GPT_FSDP, "parallel.procs_per_node=2", "parallel.mixed_precision=true",
            "--run-name", "fsdp", runs_dir=runs_dir, check=True)
    folder = runs_dir / "fsdp" / "checkpoints" / "step-000000006"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
    proc = run_cli("launch", "gpt_small", *GPT_FSDP, "parallel.procs_per_node=1", "trainer.max_steps=9",
                   "--run-name", "fsdp", runs_dir=runs_dir, check=True)
    assert "written by fsdp on 2 ranks, resumed as single on 1: resharded by DCP" in proc.stdout
    assert read_result(runs_dir / "fsdp")["step"] == 9


def test_cuda_out_of_memory_mid_training_lowers_the_micro_batch(runs_dir: Path, tmp_path: Path) -> None:
    """trainer.micro_batch=auto on one GPU: the caching allocator is capped when step 3 starts (a real
    torch.OutOfMemoryError), the micro batch halves, the step is redone and every sample is trained on once."""
    from test_micro_batch import hog_overrides, index_seen_by, launch, samples

    trigger = index_seen_by(rank=0, step=3, per_replica=16, replicas=1)
    assert trigger >= 18, "the search's probes read samples 0-17"
    run, out = launch(runs_dir, "cuda-oom", hog_overrides(
        tmp_path, "trainer.micro_batch=auto", "trainer.global_batch=16", "trainer.max_steps=5", "trainer.device=cuda",
        "parallel.procs_per_node=1", "model.kwargs.limit_rank=0", "model.kwargs.budget_mb=48",
        f"model.kwargs.trigger={trigger}", "checkpoint.at_end=false"))
    assert "out of memory at step 3 on rank(s) 0: micro batch 16 x accumulation 1 x 1 ranks = 16 -> micro batch 8" in out
    assert "CUDA out of memory" in (run / "logs" / "rank0.log").read_text()
    trained = samples(tmp_path, 0)
    assert [len(m) for m in trained] == [16, 16] + [8] * 6
    seen = [i for m in trained for i in m]
    assert len(seen) == 5 * 16 == len(set(seen))


GPT_ON_ONE_GPU = ["parallel.procs_per_node=1", "trainer.device=cuda", "trainer.max_steps=30", "trainer.eval_every=30",
                  "logging.log_every=10", "logging.progress_bar=false", "data.kwargs.max_bytes=400000",
                  "checkpoint.every_steps=0"]


def _rates(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_compiled_gpt_with_selective_checkpointing_on_one_gpu(precision: str, runs_dir: Path) -> None:
    """The language-model stack on one GPU: compiled blocks, selective activation checkpointing, bf16 (and fp8
    through torchao where the GPU has float8 tensor cores): it trains, and reports tokens/s and an MFU against
    the GPU's table peak."""
    if precision == "fp8":
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("fp8 needs compute capability 8.9+")
        pytest.importorskip("torchao.float8")
    proc = run_cli("launch", "gpt_small", *GPT_ON_ONE_GPU, f"trainer.precision={precision}", "trainer.compile=true",
                   "parallel.activation_checkpointing=selective", "--run-name", precision, runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_result(runs_dir / precision)["val/loss"] < 5.0  # below ln(256) = 5.55: it learned
    assert "torch.compile: the blocks' forward passes compiled in" in proc.stdout
    if precision == "fp8":
        assert re.search(r"fp8: \d+ linear layers run float8 matmuls", proc.stdout)
    rates = _rates(runs_dir / precision)
    assert rates and all(0 < r["mfu"] <= 1 and r["peak_mem_gb"] > 0 for r in rates if "mfu" in r), rates


def test_fp8_refused_on_a_gpu_without_float8_tensor_cores(runs_dir: Path) -> None:
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has float8 tensor cores")
    proc = run_cli("launch", "gpt_small", *GPT_ON_ONE_GPU, "trainer.precision=fp8", "--run-name", "fp8",
                   runs_dir=runs_dir)
    assert proc.returncode != 0 and "needs float8 tensor cores (compute capability 8.9+" in proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for tensor parallel over NCCL")
def test_tensor_parallel_compiled_bf16_over_nccl(runs_dir: Path) -> None:
    """TP=2 on 2 GPUs (one FSDP replica), compiled blocks, bf16 autocast, selective checkpointing: it trains and
    its sharded checkpoint exports to the plain names."""
    proc = run_cli("launch", "gpt_small", *GPT_ON_ONE_GPU, "parallel.procs_per_node=2", "parallel.strategy=fsdp",
                   "parallel.tensor_parallel=2", "trainer.precision=bf16", "trainer.compile=true",
                   "parallel.activation_checkpointing=selective", "checkpoint.every_steps=10", "--run-name", "tp",
                   runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process group: nccl, 2 ranks" in proc.stdout
    assert read_result(runs_dir / "tp")["val/loss"] < 5.0
    assert "layers.0.attn.q.weight" in final_params(runs_dir / "tp")
