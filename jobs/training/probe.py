"""The search behind `trainer.micro_batch: auto`: real forward and backward passes of candidate micro
batches, agreed by the ranks, leaving the model, the RNG streams and the memory as they were."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from jobs import parallel
from jobs.training.batch import optimizer_state_bytes, probe_size, reserve, search
from jobs.training.memory import is_oom, release
from jobs.training.step import StepSettings, autocast

REPEATS = 2  # passes per candidate: the second runs with the gradients of the first allocated, as in training


def find_micro_batch(module: nn.Module, optimizers: Any, dataset: Dataset, settings: StepSettings,
                     per_replica: int) -> tuple[Optional[int], list[tuple[int, bool]]]:
    """The largest micro batch (a divisor of `per_replica`) whose probe fits on every rank, and the tries.
    The passes run on the unwrapped module (no DDP hook, no collective inside a candidate; every rank
    tries the same candidates and agrees on each), while holding the memory the optimizers will take at
    their first step. BatchNorm statistics and the RNG streams are restored afterwards; gradients dropped."""
    net, device = parallel.unwrap(module), settings.device
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    held = reserve(optimizer_state_bytes(optimizers), device)
    try:
        return search(per_replica, lambda m: not parallel.any_rank(not _fits(net, dataset, settings, m)))
    finally:
        del held
        with torch.no_grad():
            for name, b in net.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        net.zero_grad(set_to_none=True)
        release(device)


def _fits(net: nn.Module, dataset: Dataset, settings: StepSettings, micro: int) -> bool:
    failed = False
    try:
        _passes(net, dataset, settings, probe_size(micro))
    except Exception as err:  # noqa: BLE001 - anything but an allocator failure is a real error
        if not is_oom(err):
            raise
        failed = True
    net.zero_grad(set_to_none=False)  # keep the gradients allocated: training holds them too
    if failed:
        release(settings.device)  # after the except block: the error's frames no longer hold tensors
    return not failed


def _passes(net: nn.Module, dataset: Dataset, settings: StepSettings, n: int) -> None:
    x, y = default_collate([dataset[i % len(dataset)] for i in range(n)])
    x, y = x.to(settings.device), y.to(settings.device)
    net.train()
    for _ in range(REPEATS):
        with autocast(settings.trainer.precision, settings.device):
            loss = settings.objective.loss(net(x), y)
        loss.backward()
        del loss
