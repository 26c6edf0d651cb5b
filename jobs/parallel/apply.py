"""Parallelism applied to a plain model by functions (torchtitan's parallelize_*): one per strategy,
chosen by `parallel.strategy`; the trainer calls the few strategy-aware helpers here and never
tests for a wrapper class itself."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
from torch import nn

from jobs.env import RankEnv
from jobs.parallel.activation import apply_ac
from jobs.parallel.compiler import apply_compile
from jobs.parallel.float8 import apply_float8
from jobs.parallel.fsdp import apply_fsdp, check_device, is_fsdp
from jobs.parallel.pipeline import PipelineLayout, build_stage, split_points
from jobs.parallel.tensor import apply_tensor_parallel, device_mesh
from jobs.schema import ParallelConfig, TrainerConfig, UsageError

log = logging.getLogger("jobs.parallel")


def parallelize(model: nn.Module, cfg: ParallelConfig, env: RankEnv, device: torch.device,
                trainer: Optional[TrainerConfig] = None) -> nn.Module:
    """Wrap or shard a plain model for the configured strategy, in torchtitan's order: float8 layers, tensor
    parallel, activation checkpointing and compile per block, then the data-parallel wrapping (FSDP's hooks
    and DDP's reducer stay outside the compiled graphs). One rank runs the plain model whatever the strategy:
    there is nothing to spread (a pipeline needs 2 ranks: checked at load). A pipeline rank gets its stage:
    the part of the model it owns, under the model's own names."""
    if cfg.strategy == "fsdp":
        check_device(cfg, device)
    if cfg.strategy == "pipeline":
        return per_block(pipeline_stage(model, cfg, env, device), cfg, trainer, env)
    model = model.to(device)
    if trainer is not None and trainer.precision == "fp8":
        apply_float8(model, announce=env.is_main)
    mesh = device_mesh(cfg, env.world_size, device) if cfg.strategy == "fsdp" and env.distributed else None
    if mesh is not None and cfg.tensor_parallel > 1:  # first, on the plain model (torchtitan's order)
        apply_tensor_parallel(model, cfg, mesh["tp"], env.is_main)
    model = per_block(model, cfg, trainer, env)
    if not env.distributed:
        if cfg.strategy != "ddp" and env.is_main:
            log.info("%s on one rank: the plain model, nothing to shard", cfg.strategy)
        return model
    if mesh is not None:  # FSDP last, over the data-parallel dimension
        return apply_fsdp(model, cfg, env, device, mesh["dp"])
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def per_block(model: nn.Module, cfg: ParallelConfig, trainer: Optional[TrainerConfig], env: RankEnv) -> nn.Module:
    """What applies to each block of the model (or of a pipeline stage): activation checkpointing, then
    compile around it (the recomputation is compiled with the block)."""
    try:
        checkpointed = apply_ac(model, cfg.activation_checkpointing, cfg.selective_ac)
    except ValueError as err:  # a model without blocks: the recipe asks for what this model cannot take
        raise UsageError(str(err), "set parallel.activation_checkpointing=none") from None
    if checkpointed and env.is_main:
        log.info("activation checkpointing (%s%s): %s (%s)", cfg.activation_checkpointing,
                 f", {cfg.selective_ac}" if cfg.activation_checkpointing == "selective" else "",
                 _blocks(len(checkpointed)), _span(checkpointed))
    if trainer is not None and trainer.compile:
        apply_compile(model, trainer.compile_exclude, announce=env.is_main)
    return model


def pipeline_layout(cfg: ParallelConfig, env: RankEnv) -> PipelineLayout:
    """This rank's stage and replica (coordinates only: nothing collective)."""
    return PipelineLayout.of(cfg.stages, env.rank, env.world_size)


def pipeline_mesh(cfg: ParallelConfig, env: RankEnv, device: torch.device) -> PipelineLayout:
    """The layout with its (pp, dp) device mesh and groups, for the PipelineRunner. A collective."""
    return pipeline_layout(cfg, env).with_groups(device.type)


def pipeline_stage(model: nn.Module, cfg: ParallelConfig, env: RankEnv, device: torch.device) -> nn.Module:
    """This rank's stage of `cfg.stages`; the replicas of a stage build the same one (the same initial
    weights: every rank seeds the model alike)."""
    layout = pipeline_layout(cfg, env)
    points = list(cfg.split_points) if cfg.split_points is not None else None
    try:
        owned = split_points(model, points, layout.stages)
        stage = build_stage(model, layout.stage, layout.stages, owned[layout.stage], device)
    except ValueError as err:  # the recipe asks for a split this model cannot take: the user's to fix
        raise UsageError(f"parallel.strategy=pipeline: {err}") from None
    if env.is_main:
        log.info("pipeline: %d stages x %d replicas (rank = stage x %d + replica), %s schedule, %d microbatches; "
                 "stages own %s", layout.stages, layout.replicas, layout.replicas, cfg.pipeline_schedule,
                 cfg.microbatches, " | ".join(_span(o) for o in owned))
    return stage


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _span(owned: list[str]) -> str:
    return owned[0] if len(owned) == 1 else f"{owned[0]}..{owned[-1]}"


def data_parallel(cfg: ParallelConfig, env: RankEnv) -> tuple[int, int]:
    """(replicas, this rank's replica) of the data: every rank reads its own share, except in a
    pipeline, where the stages of one replica all read that replica's whole batch, and with tensor
    parallelism, where the ranks of a group (neighbours: tp is the mesh's inner dimension) all read theirs."""
    if cfg.strategy == "pipeline":
        layout = pipeline_layout(cfg, env)
        return layout.replicas, layout.replica
    return env.world_size // cfg.tensor_parallel, env.rank // cfg.tensor_parallel


def unwrap(model: nn.Module) -> nn.Module:
    """The module with the model's own parameter names (FSDP2 shards in place: it is the model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def forward_is_collective(model: nn.Module) -> bool:
    """Whether calling the model talks to the other ranks (FSDP all-gathers each block's weights):
    then every rank must call it as many times, in evaluation too."""
    return is_fsdp(model)


def abandon_backward(model: nn.Module) -> None:
    """Forget a step whose backward pass never ran (every rank calls it at the same point). A DDP forward
    pass that expected to reduce gradients leaves its reducer waiting for them; the next backward, even
    under no_sync(), would then start all-reduces that the peers never join. torch's Reducer.reset_state
    exists for this ("ensure forward can run despite previous backward not succeeding"): torch exposes it
    only as the underscored binding, so this is the one place that calls it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.reducer._reset_state()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-step's backward: with sync=False (every micro-step of an optimizer step but
    the last) gradients accumulate locally and no rank talks to another. DDP: no_sync(). FSDP:
    no reduce-scatter, and the block weights stay gathered until the last micro-step, which saves
    re-gathering them for every micro-batch at the cost of one block's full weights per block."""
    if sync:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        model.set_reshard_after_backward(False)
        yield
    else:
        yield
