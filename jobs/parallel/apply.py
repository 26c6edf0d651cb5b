"""Parallelism applied to a plain model by functions (torchtitan's parallelize_*): one per strategy,
chosen by `parallel.strategy`; the trainer calls the few strategy-aware helpers here and never
tests for a wrapper class itself."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from jobs.env import RankEnv
from jobs.parallel.fsdp import apply_fsdp, check_device, is_fsdp
from schema import ParallelConfig

log = logging.getLogger("jobs.parallel")


def parallelize(model: nn.Module, cfg: ParallelConfig, env: RankEnv, device: torch.device) -> nn.Module:
    """Wrap or shard a plain model for the configured strategy. One rank runs the plain model
    whatever the strategy: there is nothing to spread. Pipeline is refused by ParallelConfig.check()
    when the recipe is loaded; it slots in here as one more function."""
    if cfg.strategy == "fsdp":
        check_device(cfg, device)
    model = model.to(device)
    if not env.distributed:
        if cfg.strategy != "ddp" and env.is_main:
            log.info("%s on one rank: the plain model, nothing to shard", cfg.strategy)
        return model
    if cfg.strategy == "fsdp":
        return apply_fsdp(model, cfg, env, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module with the model's own parameter names (FSDP2 shards in place: it is the model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def forward_is_collective(model: nn.Module) -> bool:
    """Whether calling the model talks to the other ranks (FSDP all-gathers each block's weights):
    then every rank must call it as many times, in evaluation too."""
    return is_fsdp(model)


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
