"""Throughput and utilisation of a run, for every training log line: samples/s, tokens/s (token models),
TFLOP/s per device, MFU (model FLOPs utilisation) and peak memory.

FLOPs. `train_flops_per_sample` counts one training step (forward and backward, the recipe's loss) of
the plain model with `torch.utils.flop_counter.FlopCounterMode`, the model built on the meta device
(no memory, no weights: a large model counts in a fraction of a second) and fed meta tensors of the
first micro-batch's shape and dtype. Any model is counted, not one architecture's formula; the counter
counts matmuls, convolutions and attention (elementwise ops, norms and the optimizer are not counted, as
MFU conventionally does). The count is of the whole model, once, on rank 0: it does not depend on the
parallel layout (DDP, FSDP, pipeline stages). A model that cannot run on the meta device (one that reads
a tensor's values in forward, say) gets no count: one INFO line says why, and the rest is still logged.

A token model is one whose input is an integer (B, T) tensor: T tokens per sample, tokens/s =
samples/s x T. For `jobs.gpt` the count is exactly the closed form per sequence of T tokens
    6·N·T + 12·L·T²·d
with N the matmul parameters (12·L·d² in the blocks plus the V·d output head; the token and position
embeddings are lookups, not matmuls) and the attention term counted as the flop counter counts
scaled_dot_product_attention: Q·Kᵀ and A·V in full, 4·T²·d per layer forward and twice that backward,
the causal mask not halving it (PaLM's 6N + 12·L·T·d per token; tests/test_throughput.py checks it).

Rates. samples/s is the recipe's global batch times the optimizer steps of the window over its wall
clock (evaluations and checkpoint writes inside a window count); TFLOP/s per device is FLOPs per sample x
samples/s / world size; MFU is that over one device's peak (jobs.training.peaks: a data-sheet table for
GPUs, a cached matmul probe for CPUs, per rank's share of the cores). The first optimizer step of a
process is never in a window (it holds torch.compile's compile time, the allocator's and the kernels'
warm-up): the first window starts once it has ended, and its seconds are logged once. The FLOP count
and the CPU probe run then too, on rank 0, outside every window.

Peak memory is the largest over the ranks since the process started: on CUDA the allocator's high-water
mark (`torch.cuda.max_memory_allocated`, key peak_mem_gb), on a CPU the process's resident set high-water
mark (Linux's VmHWM, key peak_rss_gb: it includes Python, torch and the data; not getrusage's ru_maxrss,
which a process keeps across exec from the process it was forked from: a rank would report torchrun's
agent, or a test runner's, when that was larger). GB = 10⁹ bytes.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jobs.training.peaks import device_peak
from jobs.training.step import autocast

log = logging.getLogger("jobs.trainer")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_flops_per_sample(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, loss: Loss) -> float:
    """FLOPs of one training step (forward, loss, backward) per sample, for inputs shaped like `x` (a
    batch) and targets like `y`: the model `build()` makes is built on the meta device. The global RNG is
    left as it was (a model may draw while it is built)."""
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = build()
        model.train()
        inputs, targets = (torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (x, y))
        with FlopCounterMode(display=False) as counter:
            value = loss(model(inputs), targets)
            if value.requires_grad:  # a model frozen whole trains nothing: its forward pass is all there is
                value.backward()
    return counter.get_total_flops() / max(1, x.shape[0])


def tokens_per_sample(x: torch.Tensor) -> Optional[int]:
    """T for a batch of token ids (B, T) of an integer dtype; None for any other input."""
    return int(x.shape[1]) if x.dim() == 2 and not x.dtype.is_floating_point and not x.dtype.is_complex else None


def mfu(flops_per_sample: float, samples_per_s: float, devices: int, peak: float) -> float:
    """The fraction of `devices` devices' peak FLOP/s (`peak` each) that the model's FLOPs use."""
    return flops_per_sample * samples_per_s / devices / peak


def measure(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, loss: Loss, steps: int = 10,
            compile: bool = False, device: Optional[torch.device] = None, precision: str = "fp32") -> dict[str, float]:
    """A benchmark's figures for one device: a plain loop (AdamW) over the batch (x, y), `steps` timed steps
    after an untimed first one (with `compile`, the model is `torch.compile`d: that first step compiles it).
    Returns first_step_s, samples_per_s, tokens_per_s (token models), flops_per_sample, tflops_per_device
    and, where the device's peak is known, mfu (the same figures and peak as a run's log lines)."""
    device = device or torch.device("cpu")
    flops = train_flops_per_sample(build, x, y, loss)
    model = build().to(device)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = x.to(device), y.to(device)

    def timed(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            with autocast(precision, device):
                value = loss(forward(x), y)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed(1)
    samples = steps * x.shape[0] / max(timed(steps), 1e-9)
    out = {"first_step_s": first, "samples_per_s": samples, "flops_per_sample": flops,
           "tflops_per_device": flops * samples / 1e12}
    tokens = tokens_per_sample(x)
    if tokens:
        out["tokens_per_s"] = samples * tokens
    peak, _ = device_peak(device, precision)
    if peak:
        out["mfu"] = mfu(flops, samples, 1, peak)
    return out


class Throughput:
    """The rates of one log window, on every rank (peak memory is a collective); rank 0 logs them."""

    def __init__(self, build: Callable[[], nn.Module], loss: Loss, global_batch: int, device: torch.device,
                 precision: str, world_size: int, is_main: bool) -> None:
        self.build, self.loss, self.global_batch, self.device = build, loss, global_batch, device
        self.precision, self.world_size, self.is_main = precision, world_size, is_main
        self.flops: Optional[float] = None  # per sample, one training step
        self.tokens: Optional[int] = None  # per sample, for a token model
        self.peak: Optional[float] = None  # FLOP/s of one device
        self.steps, self.started, self.first_done = 0, time.perf_counter(), False

    def restart_clock(self) -> None:
        """The process's first step starts now (Trainer.fit, before its loop)."""
        self.steps, self.started = 0, time.perf_counter()

    def step_done(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After each optimizer step; the first one of the process is logged, measured and left out."""
        if self.first_done:
            self.steps += 1
            return
        self.first_done, seconds = True, time.perf_counter() - self.started
        x, y = micro[0]
        self.tokens = tokens_per_sample(x)
        if self.is_main:
            log.info("first step took %.2f s (compile, warm-up): throughput is measured from the next one", seconds)
            self._measure(x, y)
        self.restart_clock()

    def _measure(self, x: torch.Tensor, y: torch.Tensor) -> None:
        try:
            self.flops = train_flops_per_sample(self.build, x, y, self.loss)
        except Exception as err:  # noqa: BLE001 - a user's model that cannot run on meta: rates without FLOPs
            first = (str(err).splitlines() or [""])[0][:200]
            log.info("no FLOP count, so no TFLOP/s or MFU: the model does not run on the meta device (%s: %s)",
                     type(err).__name__, first)
            return
        try:
            self.peak, source = device_peak(self.device, self.precision)
        except Exception as err:  # noqa: BLE001 - a rate without MFU beats a run that fails over it
            source = f"none: {type(err).__name__}: {err}; no MFU"
        log.info("%.4g FLOPs per sample per training step (forward and backward)%s; peak: %s", self.flops,
                 f", {self.flops / self.tokens:.4g} per token" if self.tokens else "", source)

    def metrics(self) -> dict[str, float]:
        """The window's rates and the peak memory, for metrics.jsonl; starts the next window. Every rank
        calls it (the peak memory is the largest of any rank's)."""
        out: dict[str, float] = {}
        seconds, steps = time.perf_counter() - self.started, self.steps
        if steps:
            samples = steps * self.global_batch / max(seconds, 1e-9)
            out["samples_per_s"] = samples
            if self.tokens:
                out["tokens_per_s"] = samples * self.tokens
            if self.flops:
                out["tflops_per_device"] = self.flops * samples / self.world_size / 1e12
                if self.peak:
                    out["mfu"] = mfu(self.flops, samples, self.world_size, self.peak)
        self.restart_clock()
        return {**out, **self._peak_memory()}

    def _peak_memory(self) -> dict[str, float]:
        cuda = self.device.type == "cuda"
        if cuda:
            used = float(torch.cuda.max_memory_allocated(self.device))
        else:  # kilobytes on Linux, bytes on macOS
            used = float(peak_rss_bytes())
        if dist.is_initialized():
            value = torch.tensor([used], dtype=torch.float64, device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            used = value.item()
        return {"peak_mem_gb" if cuda else "peak_rss_gb": round(used / 1e9, 4)}


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark: VmHWM where /proc has it (its own memory since exec),
    else getrusage's ru_maxrss (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for entry in status:
                if entry.startswith("VmHWM:"):
                    return int(entry.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def line(metrics: dict[str, float]) -> str:
    """The log line's part: " tok/s 12,345 TFLOP/s 0.012 MFU 3.2% peak RSS 1.2 GB" (what is known)."""
    parts = []
    if "tokens_per_s" in metrics:
        parts.append(f"tok/s {metrics['tokens_per_s']:,.0f}")
    elif "samples_per_s" in metrics:
        parts.append(f"samples/s {metrics['samples_per_s']:,.1f}")
    if "tflops_per_device" in metrics:
        parts.append(f"TFLOP/s {metrics['tflops_per_device']:.3g}")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.2f}%")
    for key, name in (("peak_mem_gb", "peak mem"), ("peak_rss_gb", "peak RSS")):
        if key in metrics:
            parts.append(f"{name} {metrics[key]:.2f} GB")
    return "".join(" " + p for p in parts)
