"""The layout checks the ranks would make, made before submission on the model built on the meta
device (no memory, no weights): pipeline split points that name no block, more stages than blocks,
FSDP block patterns that match nothing, a tensor-parallel plan that is missing or cannot split the
model (heads or widths not divisible by parallel.tensor_parallel). A refusal after an hour in the queue is
the failure this avoids. A factory that cannot build on the meta device is left to the ranks' own checks."""
from __future__ import annotations

import logging

import torch

from jobs.models import build_model
from jobs.parallel.fsdp import default_blocks, matches, shard_blocks
from jobs.parallel.pipeline import split_points
from jobs.parallel.tensor import tensor_plan
from jobs.schema import ConfigError, RecipeConfig

log = logging.getLogger("launcher")


def check_layout(recipe: RecipeConfig, src: str) -> None:
    p = recipe.parallel
    try:
        with torch.device("meta"):
            model = build_model(recipe.model, src)
    except ConfigError:
        raise
    except Exception as err:  # user code that needs real tensors to build: the ranks check it
        log.debug("layout not checked before submission: building %s on the meta device failed (%s)",
                  recipe.model.factory, err)
        return
    if p.strategy == "pipeline":
        key = "parallel.split_points" if p.split_points is not None else "parallel.pipeline_stages"
        try:
            split_points(model, list(p.split_points) if p.split_points is not None else None, p.stages)
        except ValueError as err:
            hint = "start each stage at one of the valid points" if p.split_points is not None else \
                "use fewer stages (or ranks), or a model with more blocks"
            raise ConfigError(src, key, str(err), hint) from None
    if p.fsdp_blocks:
        try:
            shard_blocks(model, p.fsdp_blocks)
        except ValueError as err:
            raise ConfigError(src, "parallel.fsdp_blocks", str(err), "or drop parallel.fsdp_blocks to shard the "
                              "model's repeated layers") from None
    if p.tensor_parallel > 1:
        try:
            tensor_plan(model, p)
        except ValueError as err:
            raise ConfigError(src, "parallel.tensor_parallel", f"{p.tensor_parallel}: {err}",
                              "use a parallel.tensor_parallel that divides the heads and split widths, or 1 "
                              "(no split)") from None
    _check_blocks(recipe, model, src)


def _check_blocks(recipe: RecipeConfig, model: torch.nn.Module, src: str) -> None:
    """What activation checkpointing and compile's exclusions need: blocks, and exclusions that name some."""
    blocks = default_blocks(model)
    p, t = recipe.parallel, recipe.trainer
    if p.activation_checkpointing != "none" and not blocks:
        raise ConfigError(src, "parallel.activation_checkpointing", f"{p.activation_checkpointing}: "
                          f"{type(model).__name__} has no repeated blocks (a ModuleList/ModuleDict or Sequential of "
                          "layers) to checkpoint", "set parallel.activation_checkpointing=none")
    for i, pattern in enumerate(t.compile_exclude):
        if not any(matches(n, type(model.get_submodule(n)).__name__, pattern) for n in blocks):
            raise ConfigError(src, f"trainer.compile_exclude[{i}]", f"{pattern} matches none of the blocks "
                              f"compiled ({', '.join(blocks[:4])}{', ...' if len(blocks) > 4 else ''})",
                              "name a block (layers.3) or a block's class")
