"""Tier 2: real training processes (torchrun, 2 ranks, gloo on CPU) through the real CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import final_params, read_result, run_cli

pytestmark = pytest.mark.slow

QUICK = ["trainer.epochs=null", "model.dropout=0", "checkpoint.at_end=false", "checkpoint.every_steps=0"]


def _launch(runs_dir: Path, name: str, *overrides: str, recipe: str = "digits") -> Path:
    run_cli("launch", recipe, *overrides, "--run-name", name, runs_dir=runs_dir, check=True)
    return runs_dir / name


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_digits_two_ranks_through_cli(runs_dir: Path) -> None:
    """The smoke recipe on 2 gloo ranks: completes, >= 95% validation accuracy, run directory filled."""
    proc = run_cli("launch", "digits", "--run-name", "smoke", runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs_dir / "smoke"
    result = read_result(run_dir)
    assert result["outcome"] == "completed" and result["val/acc"] >= 0.95, result
    assert "completed at step" in proc.stdout and "val/acc" in proc.stdout
    assert "process group: gloo, 2 ranks" in proc.stdout
    assert "SmallCNN: 38,282 parameters (38,282 trainable), 0.15 MB as float32" in proc.stdout
    for rank in (0, 1):
        assert (run_dir / "logs" / f"rank{rank}.log").stat().st_size > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["run_name"] == "smoke" and len(info["run_id"]) == 12
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/acc" in x for x in lines)
    assert (run_dir / "config.yaml").exists() and (run_dir / "cluster.yaml").exists()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 rank x batch 32 for 6 steps: what both equivalence tests compare their 2-rank runs with."""
    return _launch(tmp_path_factory.mktemp("one"), "one", *QUICK, "trainer.max_steps=6", "parallel.procs_per_node=1",
                   "trainer.micro_batch=32", "trainer.global_batch=32")


def test_ddp_two_ranks_equal_one_rank_double_batch(runs_dir: Path, one_rank: Path) -> None:
    two = _launch(runs_dir, "two", *QUICK, "trainer.max_steps=6", "parallel.procs_per_node=2",
                  "trainer.micro_batch=16", "trainer.global_batch=32")
    init = _launch(runs_dir, "zero", *QUICK, "trainer.max_steps=1", "optim.lr=1e-9", "parallel.procs_per_node=1",
                   "trainer.micro_batch=32", "trainer.global_batch=32")
    assert _max_diff(final_params(two), final_params(one_rank)) < 1e-5
    assert _max_diff(final_params(two), final_params(init)) > 1e-3  # it did train: the check above is not vacuous


def test_gradient_accumulation_equivalence(runs_dir: Path, one_rank: Path) -> None:
    """2 ranks x micro 8 x 2 accumulation steps (no_sync on the first) == 1 rank x batch 32."""
    accum = _launch(runs_dir, "accum", *QUICK, "trainer.max_steps=6", "parallel.procs_per_node=2",
                    "trainer.micro_batch=8", "trainer.global_batch=32")
    assert "micro batch 8 x accumulation 2 x 2 ranks = 32" in (accum / "logs" / "rank0.log").read_text()
    assert _max_diff(final_params(accum), final_params(one_rank)) < 1e-5


def test_vgg_finetune_starts_from_pretrained_and_keeps_frozen(runs_dir: Path, tmp_path: Path) -> None:
    pre = _launch(runs_dir, "pre", *QUICK, "trainer.max_steps=8", recipe="vgg_pretrain")
    weights = tmp_path / "pretrained.pt"
    proc = run_cli("export", "pre", "--to", str(weights), runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("launch", "vgg_finetune", *QUICK, "trainer.max_steps=8", f"model.pretrained={weights}",
                   "--run-name", "fine", runs_dir=runs_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pretrained weights: {weights}" in proc.stdout and "head classifier.6 re-initialised" in proc.stdout
    before, after = torch.load(weights, weights_only=True), final_params(runs_dir / "fine")
    frozen = ["features.0", "features.3", "features.6", "features.8"]
    for key in after:
        if any(key.startswith(p + ".") for p in frozen):
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
        elif key.startswith("classifier.6"):
            continue  # new head for the target classes
        else:
            assert not torch.equal(before[key], after[key]), f"trainable {key} did not change"
    assert _max_diff({k: before[k] for k in after if "classifier.6" not in k},
                     {k: after[k] for k in after if "classifier.6" not in k}) > 0
    del pre


def test_single_rank_runs_without_process_group(runs_dir: Path) -> None:
    run_dir = _launch(runs_dir, "solo", *QUICK, "trainer.max_steps=3", "parallel.procs_per_node=1",
                      "trainer.global_batch=32", "trainer.precision=bf16")
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "process group" not in log and "completed at step 3" in log
    assert read_result(run_dir)["outcome"] == "completed"


def test_trackers_wandb_offline_and_tensorboard(runs_dir: Path) -> None:
    wb = _launch(runs_dir, "wb", *QUICK, "trainer.max_steps=2", "parallel.procs_per_node=1",
                 "trainer.global_batch=32", "logging.tracker=wandb")
    run_id = json.loads((wb / "run.json").read_text())["run_id"]
    offline = list((wb / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((wb / "wandb").iterdir())
    tb = _launch(runs_dir, "tb", *QUICK, "trainer.max_steps=2", "parallel.procs_per_node=1",
                 "trainer.global_batch=32", "logging.tracker=tensorboard")
    assert list((tb / "tensorboard").glob("events.out.tfevents.*"))


def test_time_based_saves_are_agreed_by_all_ranks(runs_dir: Path) -> None:
    """checkpoint.every_minutes: rank clocks differ, so the ranks must agree on the step to save at
    (a disagreement would deadlock the save's collective and time the test out)."""
    run_dir = _launch(runs_dir, "timed", "trainer.epochs=3", "checkpoint.every_steps=0", "checkpoint.at_end=false",
                      "checkpoint.every_minutes=0.004", "checkpoint.keep_last=100", recipe="vgg_pretrain")
    saves = [json.loads(x) for x in (run_dir / "checkpoints" / "saves.jsonl").read_text().splitlines()]
    steps = [s["step"] for s in saves if s.get("event") == "save"]
    assert len(steps) >= 2 and len(set(steps)) == len(steps), steps
    assert any(step % 11 for step in steps)  # not tied to epoch ends: taken when the clock said so


def test_launch_marks_the_first_step_of_each_start(runs_dir: Path) -> None:
    """first_step.json (what `make bench` and the Slurm tests wait on) comes from a callback the rank
    entry point registers, not from the trainer: written once per start, by rank 0, after its first step."""
    run_dir = _launch(runs_dir, "marked", *QUICK, "trainer.max_steps=3", "checkpoint.at_end=true")
    first = json.loads((run_dir / "first_step.json").read_text())
    assert first["step"] == 1 and first["time"] <= (run_dir / "result.json").stat().st_mtime
    _launch(runs_dir, "marked", *QUICK, "trainer.max_steps=5", "checkpoint.at_end=true")  # resumes at step 3
    assert json.loads((run_dir / "first_step.json").read_text())["step"] == 4
