"""User code for the micro-batch tests (tests/test_micro_batch.py), loaded by the ranks through code_dir.

- `data`: features whose column 0 is the sample's index, labels with the index beside them.
- `hog`: a small classifier whose training forward pass also holds `per_sample_mb` MiB per sample (the
  activations a large model would keep). On `limit_rank` it caps the process's address space
  (RLIMIT_AS; on a GPU the caching allocator's memory fraction) at what it uses plus `budget_mb` MiB, at
  its first training forward pass or at the first one that sees sample `trigger`: from then on torch's
  allocator really fails for a batch too large.
- `logged_loss`: cross-entropy that appends the indices of every micro-batch whose backward pass runs
  to <log_dir>/samples-rank<R>.jsonl, so a test can count which samples were trained on.
"""
from __future__ import annotations

import json
import os
import resource

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

FEATURES = 64
MIB = 2 ** 20


def data(n: int = 512, classes: int = 4, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    y = torch.stack([torch.randint(0, classes, (n,), generator=g), torch.arange(n)], 1)
    split = n * 3 // 4
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def _address_space() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


class Hog(nn.Module):
    def __init__(self, per_sample_mb: int, limit_rank: int, budget_mb: int, trigger: int | None,
                 classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES - 1, 32), nn.Tanh(), nn.Linear(32, classes))
        self.per_sample, self.limit_rank, self.budget, self.trigger = per_sample_mb * MIB, limit_rank, \
            budget_mb * MIB, trigger
        self.limited = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x[:, 1:])
        if not (self.training and self.per_sample):
            return out
        self._maybe_limit(x)
        held = x.detach().repeat(1, self.per_sample // (4 * FEATURES))  # per_sample bytes per sample
        return out + 0 * held[:, :1]

    def _maybe_limit(self, x: torch.Tensor) -> None:
        if self.limited or int(os.environ.get("RANK", "0")) != self.limit_rank:
            return
        if self.trigger is not None and self.trigger not in x[:, 0].long().tolist():
            return
        if x.is_cuda:  # the GPU tier: the caching allocator's own cap, a real torch.OutOfMemoryError beyond it
            total = torch.cuda.get_device_properties(x.device).total_memory
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(x.device) + self.budget) / total,
                                                       x.device)
        else:
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + self.budget, resource.RLIM_INFINITY))
        self.limited = True


def hog(per_sample_mb: int = 4, limit_rank: int = 1, budget_mb: int = 24, trigger: int | None = None,
        classes: int = 4) -> nn.Module:
    return Hog(per_sample_mb, limit_rank, budget_mb, trigger, classes)


def logged_loss(outputs: torch.Tensor, y: torch.Tensor, log_dir: str) -> torch.Tensor:
    loss = F.cross_entropy(outputs, y[:, 0])
    if loss.requires_grad:
        indices = y[:, 1].tolist()
        path = os.path.join(log_dir, f"samples-rank{os.environ.get('RANK', '0')}.jsonl")

        def log_backward(grad: torch.Tensor) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(indices) + "\n")

        loss.register_hook(log_backward)
    return loss
