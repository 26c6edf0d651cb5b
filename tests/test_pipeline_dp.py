"""Pipeline x data parallel (`parallel.pipeline_stages` below the world size): its refusals at load (exit 2,
one line, nothing written), and real 4-rank runs (torchrun, gloo) of a shrunk gpt_small, 2 stages x 2
replicas under GPipe and 1F1B, against DDP on 2 ranks with the same global batch and seed: the same logged
loss every step, the same final weights and validation metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import final_params, read_result, run_cli

# gpt_small shrunk hard: no dropout (the replicas' streams differ from DDP's ranks'), a clip that bites (a
# stage clipping by the norm over every rank, each stage counted once per replica, would differ), a
# global batch of 2 replicas x one micro batch of 8; the validation set is not a multiple of 2 x 8
SMALL = ["model.kwargs.dim=32", "model.kwargs.layers=3", "model.kwargs.seq_len=32", "model.kwargs.dropout=0.0",
         "model.kwargs.tied_embeddings=false", "data.kwargs.seq_len=32", "data.kwargs.max_bytes=20000",
         "trainer.global_batch=16", "trainer.micro_batch=8", "trainer.eval_every=0", "trainer.grad_clip=0.05",
         "trainer.max_steps=3", "schedule.name=constant", "schedule.warmup_steps=0",
         "logging.progress_bar=false", "logging.log_every=1"]
PIPELINE_DP = ["parallel.strategy=pipeline", "parallel.procs_per_node=4", "parallel.pipeline_stages=2",
               "parallel.microbatches=4"]
DDP = ["parallel.strategy=ddp", "parallel.procs_per_node=2"]


@pytest.mark.parametrize("overrides, key, words", [
    (["parallel.pipeline_stages=1"], "parallel.pipeline_stages", "a pipeline needs at least 2 stages"),
    (["parallel.pipeline_stages=3"], "parallel.pipeline_stages", "3 stages do not divide the world size 4"),
    (["parallel.split_points=[layers.1,layers.2]"], "parallel.split_points",
     "2 split points make 3 stages, but the pipeline has 2 (parallel.pipeline_stages)"),
    (["parallel.microbatches=3"], "parallel.microbatches", "3 does not divide trainer.micro_batch=8"),
    (["trainer.global_batch=32"], "trainer.global_batch", "32 is 2 micro batches of 8 per replica"),
    (["parallel.strategy=ddp", "parallel.microbatches=1"], "parallel.pipeline_stages",
     "only read with parallel.strategy=pipeline"),
])
def test_bad_pipeline_dp_configs_exit_2_before_anything_is_written(overrides: list[str], key: str, words: str,
                                                                   runs_dir: Path) -> None:
    proc = run_cli("launch", "gpt_small", *SMALL, *PIPELINE_DP, *overrides, "--run-name", "bad", runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "gpt_small.yaml" in lines[0], proc.stderr
    assert f"{key}:" in lines[0] and words in lines[0], proc.stderr
    assert not any(runs_dir.iterdir())


def _launch(runs_dir: Path, name: str, *overrides: str) -> Path:
    run_cli("launch", "gpt_small", *SMALL, *overrides, "--run-name", name, runs_dir=runs_dir, check=True, timeout=300)
    return runs_dir / name


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", *DDP)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_x_ddp_trains_as_ddp(ddp_run: Path, schedule: str, runs_dir: Path) -> None:
    """2 stages x 2 replicas end where DDP on 2 ranks ends: each replica reads DDP rank r's share, the
    replicas average their gradients before the clip, the logged loss is the replicas' mean, and the
    replicas' validation shares make up the validation set once."""
    run = _launch(runs_dir, schedule, *PIPELINE_DP, f"parallel.pipeline_schedule={schedule}")
    reference, weights = final_params(ddp_run), final_params(run)
    assert list(weights) == list(reference)  # one copy of each name, in the model's order
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-5
    assert _losses(run) == pytest.approx(_losses(ddp_run), abs=1e-5) and len(_losses(run)) == 3
    for metric in ("val/loss", "val/bpb"):
        assert read_result(run)[metric] == pytest.approx(read_result(ddp_run)[metric], abs=1e-5), metric
    log = (run / "logs" / "rank0.log").read_text()
    assert "pipeline: 2 stages x 2 replicas" in log and "2 data-parallel replicas of 2 pipeline stages" in log


@pytest.mark.slow
def test_pipeline_x_ddp_resumes_where_it_stopped(ddp_run: Path, runs_dir: Path) -> None:
    """Stopped after 2 of DDP's 3 steps (a checkpoint at the end), relaunched: ends on DDP's weights."""
    _launch(runs_dir, "resumed", *PIPELINE_DP, "trainer.max_steps=2")
    run = _launch(runs_dir, "resumed", *PIPELINE_DP)
    assert "resumed from" in (run / "logs" / "rank0.log").read_text()
    reference, weights = final_params(ddp_run), final_params(run)
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-5
