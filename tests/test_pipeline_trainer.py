"""`parallel.strategy: pipeline` through the trainer: bad pipeline configs refused at load (exit 2, nothing
written), and real 2-rank runs (torchrun, gloo) of a shrunk gpt_small: two stages under GPipe and 1F1B end
where one process ends on the same global batch (also compiled, with activation checkpointing), and a pipeline
checkpoint resumes on one DDP rank."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import final_params, read_result, run_cli

# gpt_small shrunk hard; no dropout (one process cannot draw two stages' streams), a constant lr (a 2-step
# launch must follow the schedule of the 4-step one it is resumed into), a clip that bites
SMALL = ["model.kwargs.dim=32", "model.kwargs.layers=3", "model.kwargs.seq_len=32", "model.kwargs.dropout=0.0",
         "model.kwargs.tied_embeddings=false", "data.kwargs.seq_len=32", "data.kwargs.max_bytes=20000",
         "trainer.global_batch=8", "trainer.micro_batch=8", "trainer.eval_every=0", "trainer.grad_clip=0.05",
         "schedule.name=constant", "schedule.warmup_steps=0", "checkpoint.every_steps=2",
         "logging.progress_bar=false", "logging.log_every=1"]
PIPELINE = ["parallel.strategy=pipeline", "parallel.procs_per_node=2", "parallel.microbatches=4"]
ONE_PROCESS = ["parallel.strategy=ddp", "parallel.procs_per_node=1"]


@pytest.mark.parametrize("overrides, key, words", [
    (["parallel.procs_per_node=1"], "parallel.strategy", "at least 2 ranks"),
    (["parallel.split_points=[layers.1,layers.2]"], "parallel.split_points", "make 3 stages, but the pipeline has 2"),
    (["parallel.pipeline_schedule=interleaved_1f1b"], "parallel.pipeline_schedule", "several stages per rank"),
    (["parallel.pipeline_schedule=gpip"], "parallel.pipeline_schedule", "unknown schedule"),
    (["parallel.microbatches=3"], "parallel.microbatches", "does not divide trainer.micro_batch=8"),
    (["parallel.microbatches=0"], "parallel.microbatches", ""),
    (["trainer.global_batch=16"], "trainer.global_batch", "does not accumulate gradients"),
    (["model.kwargs.tied_embeddings=true"], "model.kwargs.tied_embeddings", "summed across stages"),
    (["trainer.precision=bf16"], "trainer.precision", "not built yet"),
    (["parallel.strategy=ddp", "parallel.microbatches=2"], "parallel.microbatches", "only read with"),
    # checked against the model itself (built on the meta device) before anything is queued
    (["parallel.split_points=[layers.7]"], "parallel.split_points", "valid points: layers.1, layers.2"),
    (["parallel.procs_per_node=4"], "parallel.pipeline_stages", "the model has 3 blocks"),
])
def test_bad_pipeline_configs_exit_2_before_anything_is_written(overrides: list[str], key: str, words: str,
                                                                runs_dir: Path) -> None:
    proc = run_cli("launch", "gpt_small", *SMALL, *PIPELINE, *overrides, "--run-name", "bad", runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and f"{key}:" in first and words in first, proc.stderr
    assert not any(runs_dir.iterdir())


def _launch(runs_dir: Path, name: str, *overrides: str) -> Path:
    run_cli("launch", "gpt_small", *SMALL, *overrides, "--run-name", name, runs_dir=runs_dir, check=True, timeout=300)
    return runs_dir / name


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)  # the same names in the same order: export and resume see one model
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_pipeline_trains_as_one_process_and_resumes_on_one_ddp_rank(runs_dir: Path) -> None:
    """4 steps of the same 8-sample batches: 2 stages (GPipe split after layers.0, 1F1B balanced) end where
    one process ends, and evaluate the same val/loss and val/bpb (the validation set is not a multiple of
    the batch: the padded last batch must count each sample once). A pipeline stopped at step 2 resumes
    on one DDP rank and ends there too (weights and AdamW state gathered from both stages)."""
    one = _launch(runs_dir, "one", *ONE_PROCESS, "trainer.max_steps=4")
    pipes = {"gpipe": _launch(runs_dir, "gpipe", *PIPELINE, "trainer.max_steps=4", "parallel.pipeline_schedule=gpipe",
                              "parallel.split_points=[layers.1]"),
             # compiled, with full activation checkpointing: each stage's blocks (inductor sums in another order)
             "1f1b": _launch(runs_dir, "1f1b", *PIPELINE, "trainer.max_steps=4", "parallel.pipeline_schedule=1f1b",
                             "trainer.compile=true", "parallel.activation_checkpointing=full")}
    reference, start = final_params(one), read_result(one)
    for schedule, run in pipes.items():
        assert _max_diff(reference, final_params(run)) < (1e-5 if schedule == "gpipe" else 1e-4), schedule
        result = read_result(run)
        for metric in ("val/loss", "val/bpb"):
            assert result[metric] == pytest.approx(start[metric], abs=1e-5), (schedule, metric)
    log = (pipes["gpipe"] / "logs" / "rank0.log").read_text()
    assert "stages own tok_embeddings..layers.0 | layers.1..output" in log
    log = (pipes["1f1b"] / "logs" / "rank0.log").read_text()
    assert "activation checkpointing (full): 1 block (layers.0)" in log  # stage 0: the first of 3 blocks
    assert "torch.compile: 1 block (compiled on their first call)" in log

    _launch(runs_dir, "moved", *PIPELINE, "trainer.max_steps=2")
    moved = _launch(runs_dir, "moved", *ONE_PROCESS, "trainer.max_steps=4")
    log = (moved / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and ": step 2, epoch 0, step 2 in epoch" in log
    assert read_result(moved)["step"] == 4
    assert _max_diff(reference, final_params(moved)) < 1e-5
