"""Activation checkpointing (`parallel.activation_checkpointing`), applied per block by a function as
torchtitan's apply_ac, never in model files.

- full: a block keeps only its input for the backward pass and runs its forward again there;
- selective "op": inside each block, the outputs of attention and of every other matmul are kept, the rest
  (norms, activations, the other matmuls) recomputed: most of full's memory saving for a fraction of its
  compute (torchtitan's op-level policy);
- selective N: every Nth block is fully checkpointed, the others keep everything.

The block's own module stays where it is (its `forward` is what runs under torch.utils.checkpoint), so
parameter names, state dicts and checkpoints are the same with and without it. Recomputation replays the
RNG state (dropout draws the same masks), so the numbers are the same as without checkpointing.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from jobs.parallel.fsdp import default_blocks

log = logging.getLogger("jobs.parallel")

_aten = torch.ops.aten
# what the "op" policy keeps: the expensive results (torchtitan's _save_list, with the CPU's attention kernel)
_KEPT = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten.max.default,
}
_MATMULS = {_aten.mm.default, _aten.addmm.default}


def apply_ac(model: nn.Module, mode: str, selective: Union[int, str]) -> list[str]:
    """Checkpoint the model's blocks in place; returns the names of the blocks checkpointed."""
    if mode == "none":
        return []
    blocks = default_blocks(model)
    if not blocks:
        raise ValueError(f"parallel.activation_checkpointing={mode}: {type(model).__name__} has no repeated "
                         "blocks (a ModuleList/ModuleDict or Sequential of layers) to checkpoint")
    if mode == "selective" and selective != "op":
        every = int(selective)
        blocks = [name for i, name in enumerate(blocks) if (i + 1) % every == 0]
    context = _op_policy_context if mode == "selective" and selective == "op" else None
    for name in blocks:
        _checkpoint_forward(model.get_submodule(name), context)
    return blocks


def _checkpoint_forward(block: nn.Module, context: Callable[[], Any] | None) -> None:
    """Run `block.forward` under non-reentrant checkpointing (the kind that composes with FSDP2, DDP and
    torch.compile). Set on the instance, so the module tree and its names do not change."""
    forward = block.forward
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    if context is not None:
        kwargs["context_fn"] = context

    @functools.wraps(forward)
    def checkpointed(*args: Any, **inputs: Any) -> Any:
        return checkpoint(forward, *args, **kwargs, **inputs)

    block.forward = checkpointed


def _op_policy_context() -> Any:
    """A fresh policy per checkpointed call: the matmul count decides which half is kept, and the
    recomputation must count its matmuls the same way the forward pass did."""
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in _MATMULS:
            key = "recompute" if ctx.is_recompute else "forward"
            counts[key] += 1
            if counts[key] % 2 == 0:  # every second matmul is recomputed
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
