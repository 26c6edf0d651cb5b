"""Tier 1: throughput and utilisation (jobs/training/throughput.py, jobs/training/peaks.py): the FLOP count of
one training step against closed forms, the table of GPU peaks, the CPU peak's cache, a short real run's
metrics.jsonl, and `launcher status`'s line read from a metrics.jsonl. The same keys in a 2-rank run launched
through the CLI: tests/test_gpt.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jobs.env import RankEnv
from jobs.gpt import gpt, lm_loss
from jobs.models import cnn
from jobs.preempt import StopFlag
from jobs.schema import StorageConfig, load_recipe
from jobs.training import peaks
from jobs.training.context import RunContext
from jobs.training.run import train
from jobs.training.throughput import Throughput, measure, mfu, tokens_per_sample, train_flops_per_sample
from launcher.plot import latest_rates


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own cache folder: the user's ~/.cache is neither read nor written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _gpt_closed_form(seq_len: int, dim: int, layers: int, vocab: int = 256) -> float:
    """6·N·T + 12·L·T²·d per sequence: N the matmul parameters (12·L·d² in the blocks, V·d in the output
    head), the attention term Q·Kᵀ and A·V (2·T²·d each forward, twice that backward) per layer."""
    matmul_params = 12 * layers * dim ** 2 + vocab * dim
    return 6 * matmul_params * seq_len + 12 * layers * seq_len ** 2 * dim


@pytest.mark.parametrize("size", [dict(seq_len=64, dim=64, layers=2, heads=4),
                                  dict(seq_len=256, dim=192, layers=6, heads=6, tied_embeddings=False)])
def test_gpt_flops_match_the_closed_form(size: dict) -> None:
    tokens = torch.zeros(3, size["seq_len"], dtype=torch.long)
    counted = train_flops_per_sample(lambda: gpt(**size), tokens, tokens, lm_loss)
    expected = _gpt_closed_form(size["seq_len"], size["dim"], size["layers"])
    assert counted == pytest.approx(expected, rel=0.02)
    assert tokens_per_sample(tokens) == size["seq_len"]


def test_cnn_flops_are_three_forward_passes_but_the_first_layers_input_gradient() -> None:
    """The digits CNN: forward 2·MACs, backward 4·MACs, except that the image needs no gradient (conv1's
    input gradient is not computed). A count of the forward pass alone, or of backward twice, is off by 2x+."""
    recipe = load_recipe("digits")
    images = torch.zeros(4, 1, 8, 8)
    counted = train_flops_per_sample(lambda: cnn(recipe.model), images, torch.zeros(4, dtype=torch.long),
                                     F.cross_entropy)
    conv1, conv2, fc1, fc2 = 8 * 8 * 1 * 16 * 9, 8 * 8 * 16 * 32 * 9, 32 * 4 * 4 * 64, 64 * 10
    assert counted == pytest.approx(6 * (conv1 + conv2 + fc1 + fc2) - 2 * conv1, rel=0.02)
    assert tokens_per_sample(images) is None  # images are not tokens, nor are float (B, T) inputs
    assert tokens_per_sample(torch.zeros(4, 16)) is None


def test_counting_leaves_the_global_rng_as_it_was() -> None:
    """A model that draws from the CPU generator while it is built: counting it must not shift the run's
    dropout stream (the trainer has seeded it already)."""
    class Draws(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 2)
            torch.randint(10, (3,), device="cpu")

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_flops_per_sample(Draws, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), F.cross_entropy)
    assert torch.equal(torch.rand(3), expected)


def test_gpu_peaks_pick_the_right_row_and_column() -> None:
    tera = 1e12
    assert peaks.gpu_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == pytest.approx(989.4 * tera)
    assert peaks.gpu_peak("NVIDIA H100 PCIe", "bf16", tf32=False) == pytest.approx(756 * tera)
    assert peaks.gpu_peak("NVIDIA H200", "fp16", tf32=False) == pytest.approx(989.4 * tera)
    assert peaks.gpu_peak("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == pytest.approx(156 * tera)
    assert peaks.gpu_peak("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == pytest.approx(19.5 * tera)
    assert peaks.gpu_peak("NVIDIA A10G", "bf16", tf32=False) == pytest.approx(70 * tera)  # not the A100's row
    assert peaks.gpu_peak("NVIDIA L40S", "bf16", tf32=False) == pytest.approx(362.1 * tera)  # not the L4's
    assert peaks.gpu_peak("NVIDIA L4", "bf16", tf32=False) == pytest.approx(121 * tera)
    assert peaks.gpu_peak("Tesla V100-SXM2-16GB", "fp32", tf32=True) == pytest.approx(15.7 * tera)  # no TF32
    assert peaks.gpu_peak("Some Future GPU", "bf16", tf32=False) is None


def test_cpu_peak_is_probed_once_then_read_from_the_cache(tmp_path: Path) -> None:
    probes: list[tuple[torch.dtype, int]] = []

    def probe(dtype: torch.dtype, threads: int) -> float:
        probes.append((dtype, threads))
        return 1.5e11

    assert peaks.cpu_peak(torch.float32, probe) == (1.5e11, False)
    path = tmp_path / "cache" / "torchferry" / "cpu_peak.json"
    entries = json.loads(path.read_text())
    [key] = entries
    assert entries[key] == 1.5e11 and peaks.cpu_model() in key and f"{torch.get_num_threads()} threads" in key
    assert peaks.cpu_peak(torch.float32, probe) == (1.5e11, True)
    assert len(probes) == 1
    path.write_text(json.dumps({key: 7.0e10}))  # what the cache says is what is used
    assert peaks.cpu_peak(torch.float32, probe) == (7.0e10, True) and len(probes) == 1
    assert peaks.cpu_peak(torch.bfloat16, probe) == (1.5e11, False)  # another dtype: probed, added beside
    assert len(probes) == 2 and len(json.loads(path.read_text())) == 2
    path.write_text("{cut sho")  # damaged: probed again and rewritten
    assert peaks.cpu_peak(torch.float32, probe) == (1.5e11, False)
    assert len(probes) == 3 and key in json.loads(path.read_text())


def test_a_model_that_cannot_run_on_meta_still_gets_rates(caplog: pytest.LogCaptureFixture) -> None:
    class ReadsValues(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float(x.abs().max().item() > 0)  # .item() has no value on meta

    meter = Throughput(lambda: ReadsValues(4, 2), F.cross_entropy, global_batch=8, device=torch.device("cpu"),
                       precision="fp32", world_size=1, is_main=True)
    batch = [(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))]
    with caplog.at_level(logging.INFO, logger="jobs.trainer"):
        meter.restart_clock()
        meter.step_done(batch)
        assert "samples_per_s" not in meter.metrics()  # the first step of a process is never measured
        meter.step_done(batch)
        rates = meter.metrics()
    assert rates["samples_per_s"] > 0 and rates["peak_rss_gb"] > 0
    assert "mfu" not in rates and "tflops_per_device" not in rates
    assert "no FLOP count, so no TFLOP/s or MFU: the model does not run on the meta device" in caplog.text


def test_a_short_run_logs_rates_and_an_mfu_in_0_1(tmp_path: Path) -> None:
    """The digits CNN in-process on one rank, a line every step: step 1 (the process's first) carries no
    rate, every later line carries samples/s, TFLOP/s and MFU consistent with one another."""
    recipe = load_recipe("digits", ["parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=4",
                                    "checkpoint.every_steps=0", "checkpoint.at_end=false",
                                    "logging.progress_bar=false", "logging.log_every=1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(recipe, RunContext(run_dir, "run", "id", False, None), StorageConfig(), RankEnv.from_environ({}), StopFlag())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(steps) == [1, 2, 3, 4]
    assert "samples_per_s" not in steps[1] and steps[1]["peak_rss_gb"] > 0.05  # torch alone is ~0.3 GB
    for row in (steps[2], steps[3], steps[4]):
        assert 0 < row["mfu"] <= 1, row
        flops = 6 * (9216 + 294912 + 32768 + 640) - 2 * 9216  # the CNN's count (test above)
        assert row["tflops_per_device"] == pytest.approx(flops * row["samples_per_s"] / 1e12, rel=0.02)
        assert "tokens_per_s" not in row
    [peak] = json.loads((tmp_path / "cache" / "torchferry" / "cpu_peak.json").read_text()).values()
    assert steps[2]["mfu"] == pytest.approx(mfu(flops, steps[2]["samples_per_s"], 1, peak))
    shown = latest_rates(run_dir)  # what `launcher status` prints
    assert shown.startswith(f"{steps[4]['samples_per_s']:,.1f} samples/s") and shown.endswith("(step 4)"), shown
    assert f"MFU {100 * steps[4]['mfu']:.2f}%" in shown


def test_the_benchmarks_measure_gives_an_mfu_in_0_1() -> None:
    """`measure` (what a benchmark calls, eager or compiled): a small GPT on this CPU, eager."""
    size = dict(seq_len=32, dim=32, layers=2, heads=2)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    got = measure(lambda: gpt(**size), tokens, tokens, lm_loss, steps=3)
    assert 0 < got["mfu"] <= 1 and got["first_step_s"] > 0, got
    assert got["tokens_per_s"] == pytest.approx(got["samples_per_s"] * 32)
    assert got["flops_per_sample"] == pytest.approx(_gpt_closed_form(32, 32, 2), rel=0.02)


def test_status_line_is_the_newest_rates(tmp_path: Path) -> None:
    rows = [{"step": 10, "train/loss": 2.0, "samples_per_s": 50.0, "tokens_per_s": 6400.0, "mfu": 0.1,
             "tflops_per_device": 0.02, "peak_rss_gb": 1.5},
            {"step": 20, "train/loss": 1.0, "samples_per_s": 100.0, "tokens_per_s": 12800.0, "mfu": 0.2512,
             "tflops_per_device": 0.04, "peak_rss_gb": 1.75},
            {"step": 20, "val/loss": 1.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "sam')
    assert latest_rates(tmp_path) == "12,800 tok/s, 0.04 TFLOP/s per device, MFU 25.12%, peak RSS 1.75 GB (step 20)"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples_per_s": 12.5, "peak_mem_gb": 3.0}))
    assert latest_rates(tmp_path) == "12.5 samples/s, peak memory 3.00 GB (step 1)"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
    assert latest_rates(tmp_path) is None
    assert latest_rates(tmp_path / "missing") is None
