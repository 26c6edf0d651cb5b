"""Tier 3: the same runs on CUDA/NCCL. Skipped, with the reason, where no GPU is present (CI)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_result, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_single_gpu_run(precision: str, runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "parallel.procs_per_node=1", "trainer.global_batch=32",
                   "trainer.device=cuda", f"trainer.precision={precision}", "--run-name", precision,
                   runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device cuda:0 (requested)" in proc.stdout
    assert read_result(runs_dir / precision)["val/acc"] >= 0.9


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL")
def test_two_gpu_nccl_run(runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "trainer.device=cuda", "--run-name", "nccl", runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process group: nccl, 2 ranks" in proc.stdout


def test_gpu_checkpoint_resumes_on_cpu(runs_dir: Path, tmp_path: Path) -> None:
    """Written on a GPU, loaded with map_location onto a CPU-only run."""
    run_cli("launch", "digits", "parallel.procs_per_node=1", "trainer.global_batch=32", "trainer.device=cuda",
            "trainer.epochs=2", "--run-name", "g", runs_dir=runs_dir, check=True)
    proc = run_cli("launch", "digits", "parallel.procs_per_node=1", "trainer.global_batch=32", "trainer.device=cuda",
                   "trainer.epochs=2", "--run-name", "g", runs_dir=runs_dir, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "no CUDA device" in proc.stdout + proc.stderr  # device=cuda is not silently CPU
    out = tmp_path / "w.pt"
    run_cli("export", "g", "--to", str(out), runs_dir=runs_dir, env={"CUDA_VISIBLE_DEVICES": ""}, check=True)
    assert all(t.device.type == "cpu" for t in torch.load(out, weights_only=True).values())
