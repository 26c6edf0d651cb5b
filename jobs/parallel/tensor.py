"""Tensor parallelism (`parallel.tensor_parallel: N`, torchtitan's apply_tp): the model's plan, a module name
pattern -> "colwise" | "rowwise" dict, applied with parallelize_module on the "tp" dimension of a 2-D
(dp, tp) device mesh, tp innermost (ranks r .. r + N - 1 form a group). FSDP then shards over "dp".

A column-wise layer holds out_features / N of its outputs (a rank computes its share of the heads or hidden
units), a row-wise one in_features / N of its inputs, its partial outputs summed across the group. The plan
comes from `parallel.tp_plan` (an import path) or the model's own `tensor_parallel_plan(N)` method. Each
parameter keeps its name: a split one becomes a DTensor on the tp mesh, which DCP reshards to any layout."""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterable, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from jobs.schema import ParallelConfig, UsageError

log = logging.getLogger("jobs.parallel")
Plan = dict[str, Union[str, ParallelStyle]]
STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
PLAN_HINT = ("give parallel.tp_plan=pkg.module:function, a function of (model, tensor_parallel) returning "
             "{module name pattern: 'colwise' | 'rowwise'}, or a tensor_parallel_plan(ranks) method on the model")


def device_mesh(cfg: ParallelConfig, world_size: int, device: torch.device) -> DeviceMesh:
    """The ranks' mesh: (dp, tp) with tensor parallelism, tp innermost so that a group's ranks are
    neighbours (on one node where tensor_parallel divides procs_per_node); else a 1-D dp mesh. A collective."""
    if cfg.tensor_parallel == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(device.type, (world_size // cfg.tensor_parallel, cfg.tensor_parallel),
                            mesh_dim_names=("dp", "tp"))


def apply_tensor_parallel(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, is_main: bool) -> None:
    """Split the planned layers of `model` in place over `mesh` (the tp dimension)."""
    try:
        plan = tensor_plan(model, cfg)
    except ValueError as err:  # checked before launch where the model builds on the meta device
        raise UsageError(f"parallel.tensor_parallel={cfg.tensor_parallel}: {err}") from None
    parallelize_module(model, mesh, {name: STYLES[style]() if isinstance(style, str) else style
                                     for name, style in plan.items()})
    if is_main:
        log.info("tensor parallel: groups of %d ranks; %d layers split (%s)", cfg.tensor_parallel, len(plan),
                 _few(plan))


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ where the gradients live on different meshes: with tensor parallelism the split
    layers' are DTensors on (dp, tp), the replicated layers' DTensors on dp only, and torch cannot stack norms
    of different meshes. Each mesh's gradients give their norm, reduced over that mesh's ranks (full_tensor),
    then the norms combine: the whole model's norm, the same on every rank, as torchtitan computes it. With
    gradients on one mesh or none (DDP, FSDP alone) this is torch's own function."""
    params = list(parameters)
    groups: dict[Any, list[torch.Tensor]] = {}  # by mesh: torch's foreach kernels take one mesh at a time
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if len(groups) <= 1:
        return nn.utils.clip_grad_norm_(params, max_norm)
    norms = [nn.utils.get_total_norm([p.grad for p in group]) for group in groups.values()]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    for group in groups.values():
        nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def tensor_plan(model: nn.Module, cfg: ParallelConfig) -> Plan:
    """The plan for this model, its patterns expanded to module names, each split layer's width checked.
    ValueError when the model has no plan or the plan cannot split it (the user's to fix)."""
    ranks, declared = cfg.tensor_parallel, declared_plan(model, cfg)
    plan: Plan = {}
    for pattern, style in declared.items():
        if isinstance(style, str) and style not in STYLES:
            raise ValueError(f"the tensor-parallel plan gives {pattern!r} the style {style!r}; styles are "
                             f"{', '.join(STYLES)} (or a torch ParallelStyle)")
        names = [name for name, _ in model.named_modules() if name and _matches(name, pattern)]
        if not names:
            raise ValueError(f"the tensor-parallel plan's {pattern!r} matches no module of {type(model).__name__} "
                             f"(its children: {', '.join(n for n, _ in model.named_children())})")
        for name in names:
            _check_width(name, model.get_submodule(name), style, ranks)
            plan[name] = style
    return plan


def declared_plan(model: nn.Module, cfg: ParallelConfig) -> Plan:
    """parallel.tp_plan's function called with (model, tensor_parallel), or the model's own method."""
    if cfg.tp_plan is not None:
        from jobs.targets import resolve  # the user's module: imported where the plan is asked for

        plan = resolve("recipe", "parallel.tp_plan", cfg.tp_plan)(model, cfg.tensor_parallel)
        source = cfg.tp_plan
    else:
        method = getattr(model, "tensor_parallel_plan", None)
        if method is None:
            raise ValueError(f"{type(model).__name__} has no tensor-parallel plan: {PLAN_HINT}")
        plan, source = method(cfg.tensor_parallel), f"{type(model).__name__}.tensor_parallel_plan"
    if not isinstance(plan, dict) or not plan or not all(isinstance(k, str) for k in plan):
        raise ValueError(f"{source} returned {type(plan).__name__} {str(plan)[:80]}, not a non-empty dict of "
                         "module name patterns")
    return plan


def _check_width(name: str, module: nn.Module, style: Any, ranks: int) -> None:
    """A split dimension must divide evenly: DTensor would give the ranks uneven shards, and a layer's
    shares (heads, hidden units) would not line up with the next layer's."""
    sizes = {nn.Linear: ("out_features", "in_features"), nn.Embedding: ("embedding_dim", "num_embeddings")}
    kind = next((k for k in sizes if isinstance(module, k)), None)
    if kind is None or not isinstance(style, str):
        return  # a style the user built, or a module whose widths this cannot read: torch checks it
    attr = sizes[kind][0 if style == "colwise" else 1]
    width = getattr(module, attr)
    if width % ranks:
        raise ValueError(f"{name} ({style}) has {attr}={width}, not divisible by parallel.tensor_parallel={ranks}")


def _matches(name: str, pattern: str) -> bool:
    """Dot-separated parts matched one by one: "layers.*.attn.q" is layers.0.attn.q, layers.1.attn.q, ..."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, wanted))


def _few(plan: Plan) -> str:
    names = list(plan)
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
