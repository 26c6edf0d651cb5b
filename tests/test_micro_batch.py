"""trainer.micro_batch=auto: the search before training and the recovery from an out-of-memory error
mid-training, on 2 real gloo ranks whose allocator really fails: tests/memory_hog.py caps a rank's
address space (RLIMIT_AS), so torch's CPU allocator raises as a GPU's would under a full device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from conftest import REPO, final_params, read_result, run_cli
from jobs.training.batch import BatchPlan, search

pytestmark = pytest.mark.slow

TESTS = REPO / "tests"
# glibc serves large blocks from its heap once a large block was freed (its mmap threshold grows) and keeps
# the freed heap mapped: the address space would stay at its peak and the cap would be hit by the heap's
# fragments instead of by the batch. A fixed threshold maps and unmaps every large block, as a GPU
# allocator returns memory that empty_cache() releases.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def hog_overrides(log_dir: Path, *extra: str) -> list[str]:
    """digits' recipe with the hog model and data: 4 MiB per sample on rank 1, which gets 24 MiB (micro
    batches up to 4 fit there, with the search's 10% headroom: 5 x 4 MiB < 24 MiB < 9 x 4 MiB)."""
    return ["model.target=memory_hog:hog", "data.target=memory_hog:data", "loss.target=memory_hog:logged_loss",
            f"loss.kwargs.log_dir={log_dir}", f"code_dir={TESTS}", "checkpoint.best_metric=null",
            "trainer.epochs=null", "trainer.grad_clip=null", "schedule.warmup_steps=0", "checkpoint.every_steps=0",
            "trainer.eval_every=0", "logging.log_every=1", *extra]


def samples(log_dir: Path, rank: int, probes: bool = False) -> list[list[int]]:
    """The micro-batches whose backward pass ran on `rank`, in order; the search's probes (samples 0, 1,
    ..., n-1 of the data set, where training draws shuffled ones) only when asked for."""
    path = log_dir / f"samples-rank{rank}.jsonl"
    batches = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [m for m in batches if probes or m != list(range(len(m)))]


def launch(runs_dir: Path, name: str, overrides: list[str]) -> tuple[Path, str]:
    proc = run_cli("launch", "digits", *overrides, "--run-name", name, runs_dir=runs_dir, env=ALLOCATOR, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs_dir / name, proc.stdout


# ---------------------------------------------------------------------- pure
def test_search_grows_then_bisects_over_the_divisors() -> None:
    tried: list[int] = []

    def fits(m: int) -> bool:
        tried.append(m)
        return m <= 20

    assert search(48, fits)[0] == 16  # 24 and 48 are the divisors above 20
    assert tried == [1, 2, 4, 8, 16, 48, 24]  # doubling (16 -> the next divisor >= 32: 48), then between
    assert search(48, lambda m: True) == (48, [(1, True), (2, True), (4, True), (8, True), (16, True), (48, True)])
    assert search(12, lambda m: False) == (None, [(1, False)])


def test_lowering_halves_and_keeps_the_global_batch() -> None:
    plan = BatchPlan(48, 1, 2)
    assert plan.line() == "micro batch 48 x accumulation 1 x 2 ranks = 96"
    steps = []
    while plan is not None:
        steps.append((plan.micro, plan.accum, plan.global_batch))
        plan = plan.lowered()
    assert steps == [(48, 1, 96), (24, 2, 96), (12, 4, 96), (6, 8, 96), (3, 16, 96), (1, 48, 96)]


# ---------------------------------------------------------------------- real ranks
def test_auto_agrees_on_the_smaller_rank_keeps_the_global_batch_and_a_relaunch_reuses_it(
        runs_dir: Path, tmp_path: Path) -> None:
    """Rank 1 has room for 4 samples, rank 0 for all 32 of its batch: both train with 4 x accumulation 8,
    every optimizer step takes 64 samples, and the relaunch reads the record instead of searching."""
    logs = tmp_path / "samples"
    logs.mkdir()
    hog = hog_overrides(logs, "trainer.micro_batch=auto", "trainer.global_batch=64", "checkpoint.at_end=true")
    run, out = launch(runs_dir, "auto", [*hog, "trainer.max_steps=2"])
    assert "micro batch 4 x accumulation 8 x 2 ranks = 64 (auto: searched" in out
    record = json.loads((run / "batch.json").read_text())
    assert (record["micro_batch"], record["grad_accum"], record["global_batch"]) == (4, 8, 64)
    assert [(t["micro_batch"], t["fits"]) for t in record["searched"]] == [(1, True), (2, True), (4, True), (8, False)]
    # two passes of 2, 3 and 5 samples (1, 2 and 4 with headroom), then 9 fails: rank 1 runs no backward pass
    assert [len(m) for m in samples(logs, 1, probes=True)[:6]] == [2, 2, 3, 3, 5, 5]
    for rank in (0, 1):
        assert [len(m) for m in samples(logs, rank)] == [4] * 16  # 2 steps x 8 micro-batches of 4
    first = [i for rank in (0, 1) for m in samples(logs, rank)[:8] for i in m]
    assert len(set(first)) == 64  # one optimizer step: 64 distinct samples over the 2 ranks

    for rank in (0, 1):
        (logs / f"samples-rank{rank}.jsonl").unlink()
    _, out = launch(runs_dir, "auto", [*hog, "trainer.max_steps=3"])
    assert "resumed from" in out and "not searched again" in out and "searched 1" not in out
    for rank in (0, 1):  # no probe: only step 3's micro-batches
        assert [len(m) for m in samples(logs, rank, probes=True)] == [4] * 8
    assert read_result(run)["outcome"] == "completed"


def index_seen_by(rank: int, step: int, per_replica: int, replicas: int = 2, n_train: int = 384) -> int:
    """The first sample rank `rank` trains on at `step` (1-based) of epoch 0, as the trainer's sampler orders them."""
    sampler = DistributedSampler(range(n_train), num_replicas=replicas, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    return list(sampler)[(step - 1) * per_replica]


def test_out_of_memory_mid_training_lowers_the_micro_batch_on_every_rank_and_redoes_the_step(
        runs_dir: Path, tmp_path: Path) -> None:
    """Rank 1's allocator fails at step 3 (its address space is capped when it meets the step's first
    sample): both ranks go from 8 to 4 samples per micro-batch at step 3, no sample is skipped or trained
    on twice, and the weights equal those of a run with micro batch 4 from the start."""
    trigger = index_seen_by(rank=1, step=3, per_replica=8)
    assert trigger >= 9, "the search's probes read samples 0-8: they must not meet the trigger"
    logs, ref_logs = tmp_path / "samples", tmp_path / "ref"
    logs.mkdir(), ref_logs.mkdir()
    common = ["trainer.global_batch=16", "trainer.max_steps=6", "model.kwargs.budget_mb=24",
              f"model.kwargs.trigger={trigger}", "checkpoint.at_end=false"]
    run, out = launch(runs_dir, "oom", hog_overrides(logs, "trainer.micro_batch=auto", *common))
    assert "micro batch 8 x accumulation 1 x 2 ranks = 16 (auto: searched" in out
    assert "out of memory at step 3 on rank(s) 1: micro batch 8 x accumulation 1 x 2 ranks = 16 -> micro batch " \
           "4 x accumulation 2 x 2 ranks = 16 (global batch kept); the step is redone" in out
    record = json.loads((run / "batch.json").read_text())
    assert record["micro_batch"] == 4 and record["lowered"] == [{"step": 3, "from": 8, "to": 4, "ranks": [1]}]
    assert read_result(run)["outcome"] == "completed"
    doctor = run_cli("doctor", "oom", runs_dir=runs_dir)  # a recovered error is named, not called a failure
    assert doctor.returncode == 0 and "ran out of memory 1 time(s) and carried on" in doctor.stdout, doctor.stdout
    assert "FAILURE" not in doctor.stdout

    seen = []
    for rank in (0, 1):
        trained = samples(logs, rank)
        # steps 1-2 in one micro-batch of 8, then steps 3-6 in two of 4, on both ranks (the failed try of
        # step 3 ran no backward pass: nothing of it was trained on)
        assert [len(m) for m in trained] == [8, 8] + [4] * 8
        seen += [i for m in trained for i in m]
    assert len(seen) == 6 * 16 and len(set(seen)) == len(seen)  # 6 steps x 16 samples, none twice

    ref, _ = launch(runs_dir, "ref", hog_overrides(ref_logs, "trainer.micro_batch=4", *common, "model.kwargs.per_sample_mb=0"))
    assert sorted(i for rank in (0, 1) for m in samples(ref_logs, rank) for i in m) == sorted(seen)
    a, b = final_params(run), final_params(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_a_model_that_fits_no_sample_fails_with_what_to_change(runs_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("launch", "digits", *hog_overrides(tmp_path, "trainer.micro_batch=auto", "trainer.global_batch=8",
                                             "trainer.max_steps=1", "model.kwargs.limit_rank=0",
                                             "model.kwargs.budget_mb=2", "parallel.procs_per_node=1"),
                   "--run-name", "nofit", runs_dir=runs_dir, env=ALLOCATOR, timeout=240)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr + (runs_dir / "nofit" / "logs" / "rank0.log").read_text()
    assert "out of memory with a micro batch of 1 sample on at least one rank (the micro batch search before " \
           "step 1)" in text
    assert "trainer.precision=bf16" in text and "parallel.strategy=fsdp" in text
