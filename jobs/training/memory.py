"""Out-of-memory errors: recognising one, giving the memory back, and the error of a model that fits
no batch at all. What to do about one (a smaller micro batch) is jobs.training.batch's business."""
from __future__ import annotations

import gc

import torch

# torch raises torch.OutOfMemoryError on CUDA; the CPU allocator raises a plain RuntimeError
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12")
_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_oom(err: BaseException) -> bool:
    """An allocator failure, on any device (not any RuntimeError: a shape error must still fail the run)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _CPU_OOM)


def release(device: torch.device) -> None:
    """Return what the failed pass held: its frames are gone once the exception is dropped, then the
    cycles are collected and the CUDA allocator's cached blocks go back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DoesNotFit(RuntimeError):
    """Not even one sample per micro-batch fits: lowering the batch cannot help."""

    def __init__(self, ranks: list[int], where: str) -> None:
        on = f"rank(s) {', '.join(map(str, ranks))}" if ranks else "at least one rank"
        super().__init__(
            f"out of memory with a micro batch of 1 sample on {on} ({where}): "
            "the model and its optimizer state do not fit. Lower the memory per sample: trainer.precision=bf16, "
            "parallel.strategy=fsdp (shards the weights and optimizer state over the ranks), a smaller model or "
            "shorter inputs")
