"""`trainer.compile` and `parallel.activation_checkpointing` (jobs.parallel.compiler, jobs.parallel.activation):
tier 1, in one process: checkpointed blocks give the same gradients and state-dict keys as plain ones and keep
less memory; a block that does not compile as one graph is named with how to leave it eager; bad values exit 2.
Tier 2, real 2-rank runs of a shrunk gpt_small: compiled (with selective checkpointing) runs as eager within
1e-4 under DDP and FSDP, and a compiled run stopped by SIGTERM and relaunched ends bit-equal to an
uninterrupted compiled run. (A pipeline with compile and full checkpointing: tests/test_pipeline_trainer.py.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, assert_refused_at_load, final_params, launch_until_step, read_result, run_cli
from jobs.gpt import gpt
from jobs.parallel.activation import apply_ac
from jobs.parallel.compiler import apply_compile
from jobs.parallel.float8 import check_float8
from jobs.schema import UsageError

AC_CASES = [("full", "op"), ("selective", "op"), ("selective", 2)]


# ---------------------------------------------------------------- tier 1: one process
def _step(mode: str, selective: object) -> tuple[list[str], float, dict[str, torch.Tensor], list[str]]:
    torch.manual_seed(0)
    model = gpt(seq_len=32, dim=32, layers=4, heads=4, dropout=0.1)  # dropout: the recomputation must replay it
    checkpointed = apply_ac(model, mode, selective)
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    return checkpointed, loss.item(), {n: p.grad for n, p in model.named_parameters()}, list(model.state_dict())


@pytest.mark.parametrize("mode, selective", AC_CASES)
def test_checkpointed_blocks_give_the_same_gradients_and_keys(mode: str, selective: object) -> None:
    _, loss, grads, keys = _step("none", "op")
    checkpointed, ac_loss, ac_grads, ac_keys = _step(mode, selective)
    assert checkpointed == (["layers.1", "layers.3"] if selective == 2 else [f"layers.{i}" for i in range(4)])
    assert ac_keys == keys  # checkpoints carry the plain names
    assert abs(ac_loss - loss) < 1e-6
    assert max((ac_grads[n] - grads[n]).abs().max().item() for n in grads) < 1e-6


def test_a_model_without_blocks_cannot_be_checkpointed() -> None:
    with pytest.raises(ValueError, match="Linear has no repeated blocks"):
        apply_ac(nn.Linear(2, 2), "full", "op")


# the high-water mark is reset to the current resident set after building (Linux: "5" to clear_refs); not
# getrusage's ru_maxrss, which survives exec: under a big test runner it never moved
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_MEASURE = """
import sys, torch
import torch.nn.functional as F
from jobs.gpt import gpt
from jobs.parallel.activation import apply_ac
from jobs.training.throughput import peak_rss_bytes
torch.manual_seed(0)
model = gpt(seq_len=256, dim=256, layers=8, heads=4)
apply_ac(model, sys.argv[1], "op" if sys.argv[2] == "op" else int(sys.argv[2]))
tokens = torch.randint(0, 256, (8, 256))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before = peak_rss_bytes()
F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
print((peak_rss_bytes() - before) // 1024)
"""


@pytest.mark.slow
def test_checkpointing_lowers_the_peak_memory_of_a_deep_model() -> None:
    """Measured: the growth of the process's peak resident memory over one forward and backward pass of an
    8-block GPT (batch 8 x 256 tokens, width 256), each setting in a fresh process. glibc's mmap threshold is
    fixed: by default it rises after large frees, and freed activations then stay resident (the measure
    followed the allocator's history, not the live tensors: full checkpointing read 0.55-0.65 of none)."""
    def growth(mode: str, selective: str = "op") -> int:
        out = subprocess.run([sys.executable, "-c", _MEASURE, mode, selective], cwd=REPO, check=True, text=True,
                             capture_output=True, env={**os.environ, **FIXED_MALLOC, "OMP_NUM_THREADS": "1"}).stdout
        return int(out.split()[-1])  # KiB

    none, full, op = growth("none"), growth("full"), growth("selective")
    print(f"peak memory growth: none {none} KiB, selective op {op} KiB, full {full} KiB")
    assert full < 0.5 * none and op < 0.8 * none, (none, op, full)


class _Branchy(nn.Module):
    """A block whose Python branches on a tensor's value: it cannot be one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if self.fc(x).sum() > 0 else x


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), _Branchy()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.slow
def test_a_block_that_does_not_compile_is_named_with_how_to_leave_it_eager() -> None:
    model = _Stack()
    assert apply_compile(model, (), announce=False) == ["layers.0", "layers.1"]
    with pytest.raises(UsageError) as err:
        model(torch.randn(2, 4))
    assert str(err.value).startswith("trainer.compile: layers.1 (_Branchy) does not compile as one graph: ")
    assert "trainer.compile_exclude=[layers.1] (or its class, _Branchy)" in err.value.hint
    excluded = _Stack()
    assert apply_compile(excluded, ("_Branchy",), announce=False) == ["layers.0"]
    x = torch.randn(2, 4)
    hidden = F.linear(x, excluded.layers[0].weight, excluded.layers[0].bias)
    assert torch.allclose(excluded(x), hidden * 2 if excluded.layers[1].fc(hidden).sum() > 0 else hidden)


def test_fp8_is_refused_on_the_cpu_with_a_hint() -> None:
    with pytest.raises(UsageError, match="fp8 needs an H100-class GPU, and this rank runs on cpu") as err:
        check_float8(torch.device("cpu"))
    assert "trainer.precision=bf16" in err.value.hint


@pytest.mark.parametrize("overrides, key", [
    (["trainer.compile_exclude=[layers.0]"], "trainer.compile_exclude"),  # without trainer.compile
    (["trainer.compile=true", "trainer.compile_exclude=[layers..0]"], "trainer.compile_exclude[0]"),
    (["parallel.selective_ac=2"], "parallel.selective_ac"),  # without activation_checkpointing=selective
    (["parallel.activation_checkpointing=selective", "parallel.selective_ac=0"], "parallel.selective_ac"),
    (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing"),
    (["trainer.precision=fp8", "trainer.device=cpu"], "trainer.precision"),
    # checked against the model built on the meta device
    (["trainer.compile=true", "trainer.compile_exclude=[blocks.*]"], "trainer.compile_exclude[0]"),
])
def test_bad_compile_and_checkpointing_values_exit_2(overrides: list[str], key: str, runs_dir: Path) -> None:
    proc = run_cli("launch", "gpt_small", *overrides, "--run-name", "bad", runs_dir=runs_dir)
    assert_refused_at_load(proc, key, runs_dir)


# ---------------------------------------------------------------- tier 2: real 2-rank runs
SHORT = ["trainer.max_steps=20", "trainer.eval_every=20", "trainer.global_batch=16", "trainer.micro_batch=8",
         "model.kwargs.dim=64", "model.kwargs.layers=2", "model.kwargs.seq_len=64", "data.kwargs.seq_len=64",
         "data.kwargs.max_bytes=100000", "checkpoint.every_steps=4", "logging.log_every=1",
         "logging.progress_bar=false"]
COMPILED = ["trainer.compile=true", "parallel.activation_checkpointing=selective"]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def eager(runs: Path) -> Path:
    run_cli("launch", "gpt_small", *SHORT, "--run-name", "eager", runs_dir=runs, check=True, timeout=300)
    return runs / "eager"


@pytest.fixture(scope="module")
def compiled(runs: Path) -> Path:
    run_cli("launch", "gpt_small", *SHORT, *COMPILED, "--run-name", "compiled", runs_dir=runs, check=True,
            timeout=600)
    return runs / "compiled"


def _close(a: dict[int, float], b: dict[int, float], tolerance: float) -> float:
    assert sorted(a) == sorted(b) == list(range(1, 21))
    return max(abs(a[s] - b[s]) for s in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_and_checkpointed_trains_as_eager(strategy: str, eager: Path, compiled: Path, runs: Path) -> None:
    """20 steps on 2 ranks: the losses of every step within 1e-4 of eager DDP's (inductor's fused kernels sum
    in another order); FSDP with compile and full checkpointing too (FSDP shards after compile wraps)."""
    run = compiled if strategy == "ddp" else runs / "fsdp"
    if strategy == "fsdp":
        run_cli("launch", "gpt_small", *SHORT, "trainer.compile=true", "parallel.activation_checkpointing=full",
                "parallel.strategy=fsdp", "--run-name", "fsdp", runs_dir=runs, check=True, timeout=600)
    assert _close(_losses(eager), _losses(run), 1e-4) < 1e-4
    assert _losses(eager) != _losses(run)  # compiled: not the very same kernels
    log = (run / "logs" / "rank0.log").read_text()
    assert "torch.compile: 2 blocks (compiled on their first call)" in log
    assert "torch.compile: the blocks' forward passes compiled in" in log
    mode = "selective, op" if strategy == "ddp" else "full"
    assert f"activation checkpointing ({mode}): 2 blocks (layers.0..layers.1)" in log
    assert list(final_params(run)) == list(final_params(eager))  # the plain names: no _orig_mod, no wrapper


@pytest.mark.slow
def test_compiled_run_stopped_and_relaunched_is_bit_equal(compiled: Path, runs: Path) -> None:
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-compile").randint(5, 7)  # between the checkpoints of steps 4 and 8
    print(f"stopping near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    proc = launch_until_step("gpt_small", [*SHORT, *COMPILED], runs, "cut", target, timeout=600)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    stopped = read_result(runs / "cut")
    assert stopped["outcome"] == "preempted" and target <= stopped["step"] < 20, (stopped, out)
    run_cli("launch", "gpt_small", *SHORT, *COMPILED, "--run-name", "cut", runs_dir=runs, check=True, timeout=600)
    assert "resumed from" in (runs / "cut" / "logs" / "rank0.log").read_text()
    expected, got = final_params(compiled), final_params(runs / "cut")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed compiled run differs"
