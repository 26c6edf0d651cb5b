"""`trainer.precision: fp8`: the model's linear layers run their matmuls in float8 (torchao's dynamic scaling,
as torchtitan's Float8 converter), everything else under bf16 autocast. H100-class GPUs only (compute
capability 8.9+: the float8 tensor cores); checked on the rank, where the device is known."""
from __future__ import annotations

import logging

import torch
from torch import nn

from jobs.schema import UsageError

log = logging.getLogger("jobs.parallel")


def check_float8(device: torch.device) -> None:
    """Refuse fp8 where it cannot run, with what to use instead."""
    if device.type != "cuda":
        raise UsageError(f"trainer.precision=fp8 needs an H100-class GPU, and this rank runs on {device}",
                         "use trainer.precision=bf16")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise UsageError(f"trainer.precision=fp8 needs float8 tensor cores (compute capability 8.9+: H100, "
                         f"L4, ...); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}",
                         "use trainer.precision=bf16")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise UsageError("trainer.precision=fp8 runs through torchao, which is not installed on this node",
                         "pip install torchao (next to the torch you have), or use trainer.precision=bf16") from None


def apply_float8(model: nn.Module, announce: bool) -> list[str]:
    """Swap the linear layers whose sizes float8 kernels take (both multiples of 16) for torchao's
    Float8Linear, in place: a subclass of nn.Linear with the same parameters, so checkpoints keep their keys.
    The output layer stays in bf16 (a vocabulary projection is where float8 costs the most accuracy)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    swapped: list[str] = []

    def eligible(module: nn.Module, name: str) -> bool:
        ok = isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0 \
            and name != "output"
        if ok:
            swapped.append(name)
        return ok

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=eligible)
    if announce:
        log.info("fp8: %d linear layers run float8 matmuls (torchao, dynamic scaling)", len(swapped))
    return swapped
