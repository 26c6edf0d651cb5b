"""FSDP2: `fully_shard` per block, then the root, on the data-parallel mesh: every rank, or with tensor
parallelism the "dp" dimension of the (dp, tp) mesh (torchtitan's apply_fsdp). Each block is one
communication group: its parameters are all-gathered just before its forward and freed after, so a rank
holds its shard plus one block's full weights at a time."""
from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from jobs.env import RankEnv
from jobs.schema import ParallelConfig

log = logging.getLogger("jobs.parallel")


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, env: RankEnv, device: torch.device,
               mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over the ranks of `mesh`; its parameter names (FQNs) are unchanged."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.mixed_precision \
        else MixedPrecisionPolicy()
    # pinned host memory speeds the copies to a GPU; a CPU-only build has no pinned memory to give
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload \
        else OffloadPolicy()
    blocks = shard_blocks(model, cfg.fsdp_blocks)
    for name in blocks:  # children before parents: fully_shard must be applied bottom-up
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)  # the rest: embeddings, heads
    if env.is_main:
        log.info("fsdp: %d ranks; %d blocks sharded apart (%s) + the root%s%s", mesh.size(), len(blocks),
                 _few(blocks), "; bf16 parameters, fp32 reduction" if cfg.mixed_precision else "",
                 "; parameters offloaded to the CPU" if cfg.cpu_offload else "")
    return model


def check_device(cfg: ParallelConfig, device: torch.device) -> None:
    """What the recipe could not check: `trainer.device: auto` became the CPU."""
    if cfg.mixed_precision and device.type != "cuda":
        # bf16 all-gathers and fp32 reduce-scatters are a GPU memory and bandwidth trade; gloo on the CPU
        # gains nothing from them
        raise ValueError(f"parallel.mixed_precision=true needs CUDA, and this rank runs on {device}: set "
                         "parallel.mixed_precision=false (or trainer.precision=bf16 for autocast)")


def shard_blocks(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The names of the submodules to shard apart, deepest first. With `patterns`: the modules whose
    name matches one (dot-separated parts matched one by one, so "layers.*" is layers.0, layers.1, ...
    but not layers.0.attn) or whose class name matches one. Without: default_blocks()."""
    if not patterns:
        names = default_blocks(model)
    else:
        names = [name for name, module in model.named_modules()
                 if name and any(matches(name, type(module).__name__, p) for p in patterns)]
        if not names:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"parallel.fsdp_blocks {list(patterns)} match no module of {type(model).__name__} "
                             f"(its children: {', '.join(children)}); use names like {children[0]}.* or class names")
    owned = [n for n in names if _has_parameters(model.get_submodule(n))]  # a ReLU has nothing to shard
    # deepest first, so that every child is sharded before a parent that matched too
    return sorted(owned, key=lambda n: n.count("."), reverse=True)


def default_blocks(model: nn.Module) -> list[str]:
    """The repeated layers: the children of the first ModuleDict/ModuleList (a transformer's
    `layers`), or else of the first Sequential, that hold parameters (a CNN's `features` convs)."""
    for kinds in ((nn.ModuleDict, nn.ModuleList), (nn.Sequential,)):
        for name, module in model.named_modules():
            if isinstance(module, kinds) and module is not model:
                return [f"{name}.{child}" for child, sub in module.named_children() if _has_parameters(sub)]
    return []  # no container: the root alone is one group


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def matches(name: str, class_name: str, pattern: str) -> bool:
    parts, wanted = name.split("."), pattern.split(".")
    by_name = len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted))
    return by_name or fnmatch.fnmatchcase(class_name, pattern)


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
