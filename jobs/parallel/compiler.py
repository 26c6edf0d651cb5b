"""`trainer.compile`: torch.compile applied per block after parallelism (torchtitan's apply_compile): the
repeated layers are the same code, so one compiled graph serves them all and a graph stays small enough to
compile quickly; the loss, the embeddings and the parallel wrappers' hooks stay eager.

Each block's `forward` is compiled on the instance (the module tree and its parameter names stay as they are,
so checkpoints carry the plain names), with
- fullgraph=True: a block that would break into pieces (data-dependent Python control flow, an unsupported
  call) fails on its first call with one line naming it and how to leave it eager (trainer.compile_exclude),
  instead of silently running slower than eager;
- dynamic=False: each batch shape gets its own specialised graph, so a run resumed after a smaller last
  batch of an epoch runs the very kernels an uninterrupted run does (a run's numbers do not depend on when
  it was stopped).
Compilation happens on the first call (first training step, first evaluation); its time is logged.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import torch
import torch._dynamo.exc as dynamo_errors
from torch import nn

from jobs.parallel.fsdp import default_blocks, matches
from jobs.schema import UsageError

log = logging.getLogger("jobs.parallel")


def apply_compile(model: nn.Module, exclude: tuple[str, ...], announce: bool) -> list[str]:
    """Compile the model's blocks (or the whole model, when it has no repeated blocks) but those matching
    `exclude`; returns the names compiled ("" for the model itself)."""
    # The blocks share their graphs (dynamo inlines nn.Modules: parameters are inputs, not guarded by
    # identity), one per batch shape and mode, all counted against one code object's recompile limit (8):
    # an auto micro-batch search, the last batches of an epoch and evaluation can reach it, and past it
    # dynamo runs the block eagerly without a word (slower, and a resumed run would not run the same kernels)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = default_blocks(model) or [""]
    kept = [n for n in blocks if not any(matches(n, type(model.get_submodule(n)).__name__, p) for p in exclude)]
    first_calls = _FirstCalls(len(kept), announce)
    for name in kept:
        module = model.get_submodule(name)
        compiled = torch.compile(module.forward, fullgraph=True, dynamic=False)
        module.forward = _named_failures(compiled, name or "the model", type(module).__name__, first_calls)
    if announce:
        left = len(blocks) - len(kept)
        log.info("torch.compile: %d block%s%s (compiled on their first call)", len(kept), "" if len(kept) == 1 else "s",
                 f", {left} left eager (trainer.compile_exclude)" if left else "")
    return kept


class _FirstCalls:
    """The time the blocks' first calls took (tracing and compiling their forward graphs), logged once."""

    def __init__(self, blocks: int, announce: bool) -> None:
        self.waiting, self.seconds, self.announce = blocks, 0.0, announce

    def done(self, seconds: float) -> None:
        self.waiting -= 1
        self.seconds += seconds
        if self.waiting == 0 and self.announce:
            log.info("torch.compile: the blocks' forward passes compiled in %.1f s", self.seconds)


def _named_failures(compiled: Callable[..., Any], name: str, kind: str, first_calls: _FirstCalls) -> Callable[..., Any]:
    called = False

    @functools.wraps(compiled)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal called
        started = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except dynamo_errors.TorchDynamoException as err:
            reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise UsageError(f"trainer.compile: {name} ({kind}) does not compile as one graph: {reason}",
                             f"leave it eager with trainer.compile_exclude=[{name}] (or its class, {kind}), "
                             "or set trainer.compile=false") from None
        if not called:
            called = True
            first_calls.done(time.perf_counter() - started)
        return out

    return run
