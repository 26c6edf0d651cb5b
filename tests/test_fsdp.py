"""FSDP2 (`parallel.strategy: fsdp`): which blocks are sharded, the optimizer state's two forms, bad
values refused at load (tier 1); and real 2-rank gloo runs through the CLI (tier 2): FSDP equals DDP,
a stopped FSDP run resumes bit-exactly, and its checkpoint resumes on 1 rank and under DDP."""
from __future__ import annotations

import os
import random
import shutil
import signal
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_refused_at_load, final_params, launch_until_step, read_result, run_cli
from jobs.models import SmallCNN, VGG
from jobs.parallel.fsdp import shard_blocks
from jobs.parallel.state import named_optimizer_state, numbered_optimizer_state
from jobs.schema import ModelConfig

QUIET = ["logging.progress_bar=false", "logging.log_every=1"]


# ---------------------------------------------------------------- tier 1: pure
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleDict({str(i): _Block() for i in range(3)})
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 10))


def test_default_blocks_are_the_repeated_layers() -> None:
    # a ModuleDict/ModuleList wins over an earlier Sequential; a Sequential's children without parameters are skipped
    assert shard_blocks(_Transformer(), ()) == ["layers.0", "layers.1", "layers.2"]
    assert shard_blocks(SmallCNN(ModelConfig(name="cnn", in_channels=1, image_size=8)), ()) == \
        ["features.0", "features.2"]
    vgg = VGG(ModelConfig(name="vgg", width=0.25, hidden=16, pool_size=1, image_size=32))
    convs = [f"features.{n}" for n, m in vgg.features.named_children() if isinstance(m, nn.Conv2d)]
    assert shard_blocks(vgg, ()) == convs and len(convs) == 8


def test_block_patterns_match_names_part_by_part_or_class_names() -> None:
    model = _Transformer()
    assert shard_blocks(model, ("layers.*",)) == ["layers.0", "layers.1", "layers.2"]  # not layers.0.attn
    # parents and children both matched: the children come first (fully_shard goes bottom-up)
    assert shard_blocks(model, ("_Block", "layers.1.mlp")) == ["layers.1.mlp", "layers.0", "layers.1", "layers.2"]
    assert shard_blocks(model, ("head.*",)) == ["head.0", "head.2"]  # the ReLU has nothing to shard
    with pytest.raises(ValueError, match=r"match no module of _Transformer \(its children: embed, layers, head\)"):
        shard_blocks(model, ("blocks.*",))


def test_optimizer_state_converts_between_numbered_and_named_forms() -> None:
    model = nn.Sequential(OrderedDict(a=nn.Linear(3, 3), b=nn.Linear(3, 2)))
    model.a.bias.requires_grad_(False)  # frozen: not in the optimizer, so the numbers skip it
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    numbered = opt.state_dict()
    named = named_optimizer_state(model, opt, numbered)
    assert named["param_groups"][0]["params"] == ["a.weight", "b.weight", "b.bias"]
    assert torch.equal(named["state"]["b.weight"]["momentum_buffer"], numbered["state"][1]["momentum_buffer"])
    back = numbered_optimizer_state(model, opt, named)
    assert back["param_groups"] == numbered["param_groups"] and back["state"].keys() == numbered["state"].keys()
    named["param_groups"][0]["params"][2] = "c.bias"
    with pytest.raises(ValueError, match="unknown: c.bias"):
        numbered_optimizer_state(model, opt, named)


@pytest.mark.parametrize("overrides, key", [
    (["parallel.strategy=pipeline", "parallel.procs_per_node=1"], "parallel.strategy"),  # a pipeline of 1 rank
    (["parallel.fsdp_blocks=[features.*]"], "parallel.fsdp_blocks"),  # strategy ddp: a forgotten strategy
    (["parallel.strategy=fsdp", "parallel.fsdp_blocks=[features..0]"], "parallel.fsdp_blocks[0]"),
    (["parallel.strategy=fsdp", "parallel.mixed_precision=true", "trainer.device=cpu"], "parallel.mixed_precision"),
    (["parallel.strategy=fsdp", "trainer.precision=fp16"], "trainer.precision"),
    (["parallel.strategy=fsdp", "parallel.cpu_offload=maybe"], "parallel.cpu_offload"),
    # checked against the model itself (built on the meta device) before anything is queued
    (["parallel.strategy=fsdp", "parallel.procs_per_node=2", "parallel.fsdp_blocks=[layers.*]"],
     "parallel.fsdp_blocks"),
])
def test_bad_fsdp_values_exit_2_before_anything_is_written(overrides: list[str], key: str, runs_dir: Path) -> None:
    proc = run_cli("launch", "digits", *overrides, "--run-name", "bad", runs_dir=runs_dir)
    assert_refused_at_load(proc, key, runs_dir)


# ---------------------------------------------------------------- tier 2: real 2-rank runs
def _launch(runs_dir: Path, name: str, *overrides: str, recipe: str = "digits") -> Path:
    run_cli("launch", recipe, *QUIET, *overrides, "--run-name", name, runs_dir=runs_dir, check=True, timeout=300)
    return runs_dir / name


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_equals_ddp_with_accumulation_clipping_and_uneven_evaluation(runs_dir: Path) -> None:
    """Same recipe and seed, 8 steps: FSDP's weights equal DDP's, without (and with CPU offload) and
    with gradient accumulation (2 micro-steps) and a clip that bites. The accumulating runs hold out 129 validation
    samples: rank 0 evaluates 2 batches of 64, rank 1 one, and FSDP must not hang on that."""
    base = ["parallel.procs_per_node=2", "trainer.max_steps=8", "checkpoint.every_steps=4"]
    plain = [*base, "trainer.grad_clip=null"]
    accum = [*base, "trainer.micro_batch=16", "trainer.grad_clip=0.05", "data.val_fraction=0.0718"]
    fsdp = {"plain": ["parallel.strategy=fsdp", "parallel.cpu_offload=true"], "accum": ["parallel.strategy=fsdp"]}
    runs = {(strategy, case): _launch(runs_dir, f"{strategy}-{case}", *overrides,
                                      *(fsdp[case] if strategy == "fsdp" else []))
            for case, overrides in (("plain", plain), ("accum", accum)) for strategy in ("ddp", "fsdp")}
    weights = {key: final_params(run) for key, run in runs.items()}
    for case in ("plain", "accum"):
        assert _max_diff(weights["ddp", case], weights["fsdp", case]) < 1e-5, case
    # the same gradients (mean of the same 64 samples) but clipped: had the clip not bitten, these would be equal
    assert _max_diff(weights["ddp", "plain"], weights["ddp", "accum"]) > 1e-3
    ddp, fsdp = read_result(runs["ddp", "accum"]), read_result(runs["fsdp", "accum"])
    assert abs(ddp["val/loss"] - fsdp["val/loss"]) < 1e-5 and ddp["val/acc"] == fsdp["val/acc"]
    # the checkpoint holds the plain model's names, as a DDP run's: export gives the same keys
    exported = {}
    for strategy in ("ddp", "fsdp"):
        out = runs_dir / f"{strategy}.pt"
        run_cli("export", f"{strategy}-accum", "--to", str(out), runs_dir=runs_dir, check=True)
        exported[strategy] = torch.load(out, weights_only=True)
    assert _max_diff(exported["ddp"], exported["fsdp"]) < 1e-5
    assert "fsdp: 2 ranks; 2 blocks sharded apart (features.0, features.2) + the root; parameters offloaded " \
        "to the CPU" in (runs["fsdp", "plain"] / "logs" / "rank0.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="trainer.device=auto picks the GPU here")
def test_mixed_precision_refused_on_a_rank_that_found_no_gpu(runs_dir: Path) -> None:
    """trainer.device=auto passes the load-time check; the rank that ends up on the CPU refuses."""
    proc = run_cli("launch", "digits", "parallel.strategy=fsdp", "parallel.mixed_precision=true",
                   "parallel.procs_per_node=1", "trainer.max_steps=1", "--run-name", "mp", runs_dir=runs_dir)
    assert proc.returncode != 0
    assert "parallel.mixed_precision=true needs CUDA, and this rank runs on cpu" in proc.stdout + proc.stderr


RESHARD = ["model.dropout=0", "schedule.name=constant", "trainer.micro_batch=16", "trainer.grad_clip=0.05",
           "checkpoint.every_steps=4"]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_rank_and_under_ddp(runs_dir: Path, tmp_path: Path) -> None:
    """A 2-rank FSDP checkpoint at step 4 resumed on 1 rank and under DDP, and a DDP one resumed under
    FSDP, continue from step 4 and end where an uninterrupted 2-rank FSDP run ends (within 1e-5).
    No dropout and a constant schedule: the RNG streams of 2 ranks cannot be matched on 1, and the
    first launch (4 steps) must follow the same schedule as the longer relaunch. The two resumes of the
    FSDP checkpoint share its first launch: the run directory is copied to a second runs folder (as to
    another machine), and each copy resumes under its own layout."""
    straight = final_params(_launch(runs_dir, "straight", *RESHARD, "trainer.max_steps=8",
                                    "parallel.strategy=fsdp", "parallel.procs_per_node=2"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = {"fsdp": _launch(runs_dir, "from-fsdp", *RESHARD, "trainer.max_steps=4", "parallel.strategy=fsdp",
                             "parallel.procs_per_node=2"),
             "ddp": _launch(runs_dir, "ddp-to-fsdp", *RESHARD, "trainer.max_steps=4", "parallel.strategy=ddp",
                            "parallel.procs_per_node=2")}
    shutil.copytree(first["fsdp"], elsewhere / "from-fsdp")
    resumes = {"fsdp2-to-1": (runs_dir, "from-fsdp", ("fsdp", 1)), "fsdp-to-ddp": (elsewhere, "from-fsdp", ("ddp", 2)),
               "ddp-to-fsdp": (runs_dir, "ddp-to-fsdp", ("fsdp", 2))}
    for case, (folder, name, (strategy, ranks)) in resumes.items():
        run = _launch(folder, name, *RESHARD, "trainer.max_steps=8", f"parallel.strategy={strategy}",
                      f"parallel.procs_per_node={ranks}")
        log = (run / "logs" / "rank0.log").read_text()
        assert "resumed from" in log and ": step 4, epoch 0, step 4 in epoch" in log, case
        assert read_result(run)["step"] == 8
        assert _max_diff(straight, final_params(run)) < 1e-5, case


@pytest.mark.slow
def test_fsdp_stopped_by_sigterm_and_relaunched_equals_uninterrupted(runs_dir: Path) -> None:
    """vgg_pretrain (dropout on: RNG streams restored too) on 2 FSDP ranks, SIGTERM at a drawn step of
    epoch 1, relaunched with the same command: bit-equal to an uninterrupted run."""
    overrides = [*QUIET, "parallel.strategy=fsdp", "parallel.procs_per_node=2", "trainer.epochs=2",
                 "checkpoint.every_steps=4"]
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-fsdp").randint(13, 18)  # inside epoch 1 (steps 12-21 of 22)
    print(f"stopping near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    proc = launch_until_step("vgg_pretrain", overrides, runs_dir, "cut", target)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to torchrun, which forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    stopped = read_result(runs_dir / "cut")
    assert stopped["outcome"] == "preempted" and 12 < stopped["step"] < 22 and stopped["checkpoints_committed"], out

    again = run_cli("launch", "vgg_pretrain", *overrides, "--run-name", "cut", runs_dir=runs_dir, check=True)
    assert "resumed from" in again.stdout and f": step {stopped['step']}, epoch 1" in again.stdout
    run_cli("launch", "vgg_pretrain", *overrides, "--run-name", "straight", runs_dir=runs_dir, check=True)
    straight, cut = final_params(runs_dir / "straight"), final_params(runs_dir / "cut")
    assert list(straight) == list(cut)
    assert all(torch.equal(straight[k], cut[k]) for k in straight), "resumed FSDP run differs from uninterrupted"
