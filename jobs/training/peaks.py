"""The peak FLOP/s of one rank's device, the denominator of MFU (model FLOPs utilisation).

- A GPU: its vendor's dense (no structured sparsity) tensor-core figure, from a table matched against
  `torch.cuda.get_device_name()`: bf16/fp16 under trainer.precision bf16/fp16; under fp32, the TF32 figure
  when torch lets matmuls use TF32 (`torch.get_float32_matmul_precision()` is not "highest"), else plain
  FP32. An unknown GPU has no peak: MFU is left out and the log says why.
- A CPU: there is no table (the figure depends on the cores, their vector units and the threads a rank
  runs), so a short matmul probe measures it: square matmuls (1024, or 2048 above 4 threads) in the
  precision's dtype, best of up to 5 within about a second, on the threads this rank has
  (`torch.get_num_threads()`). Several ranks on one machine each run with their share of the cores
  (OMP_NUM_THREADS), so the probe measures one rank's share and MFU compares like with like. The figure
  is cached in `$XDG_CACHE_HOME/torchferry/cpu_peak.json` (default `~/.cache`), keyed by CPU model,
  threads, dtype and torch version, so only the first run on a machine pays for it; a cache that cannot
  be written costs a probe per run, nothing more.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# name fragment -> dense TFLOP/s (bf16/fp16 tensor, TF32 tensor, FP32), from the vendors' data sheets. The
# first fragment found in the device's name wins: longer, more specific names first ("A100" before "A10").
GPU_PEAKS: tuple[tuple[str, tuple[float, Optional[float], float]], ...] = (
    ("B200", (2250.0, 1100.0, 80.0)),
    ("H200 NVL", (835.0, 418.0, 60.0)),
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),  # SXM and PCIe alike
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("A10G", (70.0, 35.0, 31.2)),  # AWS's A10 variant
    ("A10", (125.0, 62.5, 31.2)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX A6000", (154.8, 77.4, 38.7)),
    ("V100", (125.0, None, 15.7)),  # fp16 tensor cores only: bf16 runs there without them, the figure is an upper bound
    ("T4", (65.0, None, 8.1)),
    ("MI300X", (1307.4, 653.7, 163.4)),
    ("MI250X", (383.0, None, 95.7)),
)
PROBE_REPEATS, PROBE_BUDGET_S = 5, 1.0


def gpu_peak(name: str, precision: str, tf32: bool) -> Optional[float]:
    """FLOP/s of the GPU named `name` (as `torch.cuda.get_device_name` spells it) at `precision`
    (fp32, bf16 or fp16); `tf32`: fp32 matmuls may use TF32. None for a GPU not in GPU_PEAKS."""
    for fragment, (half, tf32_peak, fp32) in GPU_PEAKS:
        if fragment.lower() in name.lower():
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tf32_peak if tf32 and tf32_peak is not None else fp32) * 1e12
    return None


def device_peak(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one rank on `device`, where the figure comes from) for the log line. None: unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = gpu_peak(name, precision, tf32)
        kind = precision if precision != "fp32" else "tf32" if tf32 else "fp32"
        if peak is None:
            return None, f"{name} is not in the table of peaks (jobs/training/peaks.py GPU_PEAKS): no MFU"
        return peak, f"{name}, {kind} dense peak {peak / 1e12:.1f} TFLOP/s (data sheet)"
    if device.type == "cpu":
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak, cached = cpu_peak(dtype)
        how = "cached probe" if cached else "matmul probe, now cached"
        return peak, (f"CPU {cpu_model()}, {torch.get_num_threads()} thread(s), {_dtype_name(dtype)} peak "
                      f"{peak / 1e9:.1f} GFLOP/s ({how}, {cache_file()})")
    return None, f"no peak known for device type {device.type}: no MFU"


def cpu_peak(dtype: torch.dtype = torch.float32, probe: Optional[Callable[[torch.dtype, int], float]] = None
             ) -> tuple[float, bool]:
    """(FLOP/s of this process's threads on matmuls of `dtype`, whether it came from the cache). Probed
    (`probe`, default `matmul_probe`) on a cache miss and written to the cache."""
    threads = torch.get_num_threads()
    key = f"{cpu_model()} | {threads} threads | {_dtype_name(dtype)} | torch {torch.__version__}"
    path = cache_file()
    entries = _read_cache(path)
    found = entries.get(key)
    if isinstance(found, (int, float)) and found > 0:
        return float(found), True
    peak = (probe or matmul_probe)(dtype, threads)
    _write_cache(path, {**_read_cache(path), key: peak})  # read again: another run may have added its own
    return peak, False


def matmul_probe(dtype: torch.dtype, threads: int) -> float:
    """The best FLOP/s of square matmuls on this process's threads: up to PROBE_REPEATS timed runs after a
    warm-up, fewer once PROBE_BUDGET_S is spent (a CPU slow at bf16 stops early)."""
    n = 1024 if threads <= 4 else 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    start = time.perf_counter()
    torch.mm(a, b)  # warm-up: the threads start, the kernels are picked
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > PROBE_BUDGET_S:
            break
    return 2 * n ** 3 / best


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torchferry" / "cpu_peak.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: probed again and rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    """Atomically (a reader never sees half a file); a folder that cannot be written is let be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
