"""Tensor parallelism (`parallel.tensor_parallel`): the plan and its width checks, a split attention and MLP
adding up to the whole ones, bad values refused at load (tier 1); and real 4-rank gloo runs through the CLI
(tier 2): TP=2 x FSDP=2 equals DDP on 4 ranks, a stopped TP run resumes bit-exactly, and its checkpoint
resumes under DDP on 2 ranks and on 1, as a DDP checkpoint resumes under TP."""
from __future__ import annotations

import copy
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import final_params, launch_until_step, read_result, run_cli
from jobs.gpt import MLP, Attention, gpt
from jobs.parallel.tensor import tensor_plan
from jobs.schema import ParallelConfig

TP = ParallelConfig(strategy="fsdp", procs_per_node=4, tensor_parallel=2)


# ---------------------------------------------------------------- tier 1: pure
def test_gpt_plan_splits_every_block_and_checks_heads() -> None:
    model = gpt(dim=32, layers=2, heads=4)
    plan = tensor_plan(model, TP)
    assert plan["layers.1.attn.q"] == "colwise" and plan["layers.0.mlp.proj"] == "rowwise"
    assert len(plan) == 12 and not any(k.startswith(("tok_", "pos_", "norm", "output")) for k in plan)
    with pytest.raises(ValueError, match=r"model.kwargs.heads=3 is not divisible by parallel.tensor_parallel=2"):
        tensor_plan(gpt(dim=48, layers=1, heads=3), TP)


def plan_of_mlp(model: nn.Module, ranks: int) -> dict[str, str]:  # a user's plan, named by parallel.tp_plan
    return {"0": "colwise", "2": "rowwise"}


def test_a_user_plan_is_checked_against_the_widths_it_splits() -> None:
    cfg = ParallelConfig(strategy="fsdp", procs_per_node=4, tensor_parallel=2,
                         tp_plan="test_tensor_parallel:plan_of_mlp")
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
    assert tensor_plan(mlp, cfg) == {"0": "colwise", "2": "rowwise"}
    with pytest.raises(ValueError, match=r"^0 \(colwise\) has out_features=7, not divisible by "
                       r"parallel.tensor_parallel=2"):
        tensor_plan(nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 3)), cfg)
    with pytest.raises(ValueError, match="Sequential has no tensor-parallel plan: give parallel.tp_plan="):
        tensor_plan(nn.Sequential(nn.Linear(3, 8)), TP)


def _share(module: nn.Module, columns: tuple[str, ...], rows: tuple[str, ...], rank: int) -> nn.Module:
    """Rank `rank` of 2's share of `module`: its layers cut by rows (column-wise parallel: half the outputs)
    or by columns (row-wise parallel: half the inputs), as ColwiseParallel and RowwiseParallel cut them."""
    share = copy.deepcopy(module)
    for name in (*columns, *rows):
        part = getattr(module, name).weight.detach().chunk(2, dim=0 if name in columns else 1)[rank]
        layer = nn.Linear(part.shape[1], part.shape[0], bias=False)
        layer.weight.data.copy_(part)
        setattr(share, name, layer)
    return share


def test_split_attention_and_mlp_add_up_to_the_whole() -> None:
    """Each rank's heads (q, k, v by rows, proj by columns) give a partial output; the two partial outputs
    sum to the one-process output, which is what RowwiseParallel's all-reduce computes."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for module, columns, rows in ((Attention(16, 4, 0.0), ("q", "k", "v"), ("proj",)),
                                  (MLP(16, 32), ("fc",), ("proj",))):
        whole = module(x)
        parts = sum(_share(module, columns, rows, rank)(x) for rank in (0, 1))
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, key, says", [
    (["model.kwargs.dim=48", "model.kwargs.heads=3"], "parallel.tensor_parallel",
     "model.kwargs.heads=3 is not divisible by parallel.tensor_parallel=2"),
    (["parallel.tensor_parallel=3"], "parallel.tensor_parallel", "3 does not divide the world size 4"),
    (["parallel.strategy=ddp"], "parallel.tensor_parallel", "tensor parallelism is built on FSDP only"),
    (["parallel.tensor_parallel=1", "parallel.tp_plan=jobs.gpt:gpt"], "parallel.tp_plan",
     "only read with parallel.tensor_parallel > 1"),
    (["parallel.tp_plan=nowhere.plans:gpt_plan"], "parallel.tp_plan", "cannot import nowhere.plans"),
    (["parallel.tp_plan=not a path"], "parallel.tp_plan", "is not an import path"),
    (["trainer.global_batch=6"], "trainer.global_batch", "micro_batch x data-parallel size = 2 x 2 = 4"),  # 4 ranks / 2
])
def test_bad_tensor_parallel_values_exit_2_before_anything_is_written(overrides: list[str], key: str, says: str,
                                                                       runs_dir: Path) -> None:
    proc = run_cli("launch", "gpt_small", "parallel.strategy=fsdp", "parallel.procs_per_node=4",
                   "parallel.tensor_parallel=2", "trainer.micro_batch=2", *overrides, "--run-name", "bad",
                   runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and f"{key}:" in first and says in first, proc.stderr
    assert not any(runs_dir.iterdir())


def test_a_model_without_a_plan_is_refused_at_load(runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", "parallel.strategy=fsdp", "parallel.procs_per_node=2",
                   "parallel.tensor_parallel=2", "--run-name", "bad", runs_dir=runs_dir)
    assert proc.returncode == 2 and "has no tensor-parallel plan" in proc.stderr, proc.stderr
    assert not any(runs_dir.iterdir())


# ---------------------------------------------------------------- tier 2: real 4-rank runs
# A tiny GPT, no dropout, a constant schedule (a first launch of fewer steps follows the same one) and a
# clip that bites (a clip computed wrongly over the two meshes' gradients would change every weight).
TINY = ["model.kwargs.dim=32", "model.kwargs.layers=2", "model.kwargs.heads=4", "model.kwargs.seq_len=16",
        "data.kwargs.seq_len=16", "data.kwargs.max_bytes=20000", "trainer.global_batch=8", "trainer.micro_batch=2",
        "trainer.grad_clip=0.01", "trainer.eval_every=6", "schedule.name=constant", "checkpoint.every_steps=3",
        "checkpoint.keep_last=4",
        "logging.log_every=1", "logging.progress_bar=false"]
TENSOR = ["parallel.strategy=fsdp", "parallel.procs_per_node=4", "parallel.tensor_parallel=2"]
STEPS = 12


def _launch(runs_dir: Path, name: str, *overrides: str) -> Path:
    run_cli("launch", "gpt_small", *TINY, *overrides, "--run-name", name, runs_dir=runs_dir, check=True,
            timeout=300)
    return runs_dir / name


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of STEPS steps: TP=2 x FSDP=2 and DDP, both on 4 ranks."""
    runs = tmp_path_factory.mktemp("straight")
    return {"tp": _launch(runs, "tp", *TENSOR, f"trainer.max_steps={STEPS}"),
            "ddp": _launch(runs, "ddp", "parallel.procs_per_node=4", f"trainer.max_steps={STEPS}")}


@pytest.mark.slow
def test_tensor_parallel_equals_ddp_on_four_ranks(straight: dict[str, Path]) -> None:
    tp, ddp = final_params(straight["tp"]), final_params(straight["ddp"])
    assert "layers.0.attn.q.weight" in tp  # the plain model's names, not the DTensors' layout
    assert _max_diff(tp, ddp) < 1e-5
    assert abs(read_result(straight["tp"])["val/loss"] - read_result(straight["ddp"])["val/loss"]) < 1e-5
    log = (straight["tp"] / "logs" / "rank0.log").read_text()
    assert "tensor parallel: groups of 2 ranks; 12 layers split" in log and "fsdp: 2 ranks;" in log
    assert "(2 data-parallel replicas of 2-rank tensor-parallel groups)" in log
    # export reads the sharded checkpoint (DTensors on two meshes) whole, on one process
    out = straight["tp"].parent / "tp.pt"
    run_cli("export", "tp", "--to", str(out), runs_dir=straight["tp"].parent, check=True)
    assert _max_diff(torch.load(out, weights_only=True), tp) == 0


@pytest.mark.slow
def test_stopped_tensor_parallel_run_resumes_bit_exactly_and_as_ddp_or_single(
        straight: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM at a drawn step; the checkpoint written on the way out is resumed three ways: as the same
    TP run (bit-equal to the uninterrupted one), under DDP on 2 ranks and on 1 rank (DCP reshards the
    DTensors; within 1e-5). Then a DDP checkpoint resumed under TP."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-tp").randint(4, 8)
    print(f"stopping near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    overrides = [*TINY, *TENSOR, f"trainer.max_steps={STEPS}"]
    proc = launch_until_step("gpt_small", overrides, runs_dir, "cut", target)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to torchrun, which forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    stopped = read_result(runs_dir / "cut")
    assert stopped["outcome"] == "preempted" and stopped["checkpoints_committed"], out
    for layout in ("ddp", "single"):
        shutil.copytree(runs_dir / "cut", runs_dir / f"cut-as-{layout}")

    again = run_cli("launch", "gpt_small", *overrides, "--run-name", "cut", runs_dir=runs_dir, check=True)
    assert f": step {stopped['step']}, epoch 0" in again.stdout, again.stdout
    whole = final_params(straight["tp"])
    resumed = final_params(runs_dir / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "the resumed TP run differs from the uninterrupted"

    for layout, ranks in (("ddp", 2), ("single", 1)):
        run = _launch(runs_dir, f"cut-as-{layout}", f"parallel.procs_per_node={ranks}", f"trainer.max_steps={STEPS}")
        log = (run / "logs" / "rank0.log").read_text()
        assert f"written by fsdp x tp2 on 4 ranks, resumed as {layout} on {ranks}: resharded by DCP" in log, log
        assert _max_diff(whole, final_params(run)) < 1e-5, layout

    # and back: the DDP run's checkpoint at step 6 (its later ones removed) resumed under TP
    back = runs_dir / "ddp-to-tp"
    shutil.copytree(straight["ddp"], back)
    for later in (back / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 6:
            shutil.rmtree(later)
    run = _launch(runs_dir, "ddp-to-tp", *TENSOR, f"trainer.max_steps={STEPS}")
    assert "written by ddp on 4 ranks, resumed as fsdp x tp2 on 4" in (run / "logs" / "rank0.log").read_text()
    assert _max_diff(whole, final_params(run)) < 1e-5
