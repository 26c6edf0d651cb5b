"""FSDP vs tensor parallel x FSDP (TP=2 x FSDP=2) on one GPT, 4 gloo ranks: per-rank training memory and
step time (bench/fsdp_memory.py measures each layout in its own processes, so each peak RSS is its own).

Both train on the same global batch (8 sequences of 64 bytes). The parameters, gradients and AdamW state
are split 4 ways in both; what tensor parallelism changes is what a rank gathers and computes: FSDP gathers
a whole block before its forward, TP x FSDP half of one (its own columns or rows), and the activations
inside a block are split by heads and hidden units, at the cost of two all-reduces per block in each
direction."""
from __future__ import annotations

import json

from bench.run import memory_layout

LAYOUTS = ("fsdp", "fsdp-tp2")
# glibc keeps freed heap memory, and its mmap threshold grows as large blocks are freed: RSS then measured the
# allocator's history more than the tensors alive (TP's process peak was 1.43x FSDP's, while peaks measured
# phase by phase after malloc_trim were within 10%). A fixed threshold maps every block over 128 KiB on
# its own and unmaps it when freed, so RSS follows the live tensors.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run(small: bool = False) -> dict:
    out: dict = {layout: memory_layout(layout, *(["small"] if small else []), nproc=4, env=MALLOC)
                 for layout in LAYOUTS}
    fsdp, tp = out["fsdp"], out["fsdp-tp2"]
    out["train_bytes_ratio"] = tp["train_bytes"] / fsdp["train_bytes"]
    out["peak_rss_ratio"] = tp["peak_rss_bytes"] / fsdp["peak_rss_bytes"]
    out["train_peak_rss_ratio"] = tp["train_peak_rss_bytes"] / fsdp["train_peak_rss_bytes"]
    out["step_time_ratio"] = tp["s_per_step"] / fsdp["s_per_step"]
    return out


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    """The bench table's rows: (what, measured, reference, ratio)."""
    fsdp, tp = result["fsdp"], result["fsdp-tp2"]
    gib = 1024 ** 3
    return [("TP2 x FSDP2 vs FSDP, 4 ranks: peak RSS per rank while training",
             f"{tp['train_peak_rss_bytes'] / gib:.3f} GiB", f"FSDP {fsdp['train_peak_rss_bytes'] / gib:.3f} GiB",
             f"{result['train_peak_rss_ratio']:.3f}"),
            ("TP2 x FSDP2 vs FSDP: peak RSS per rank, building included", f"{tp['peak_rss_bytes'] / gib:.3f} GiB",
             f"FSDP {fsdp['peak_rss_bytes'] / gib:.3f} GiB", f"{result['peak_rss_ratio']:.3f}"),
            ("TP2 x FSDP2 vs FSDP: params + grads + AdamW per rank", f"{tp['train_bytes'] / gib:.3f} GiB",
             f"FSDP {fsdp['train_bytes'] / gib:.3f} GiB", f"{result['train_bytes_ratio']:.3f}"),
            ("TP2 x FSDP2 vs FSDP: step time", f"{tp['s_per_step']:.2f} s", f"FSDP {fsdp['s_per_step']:.2f} s",
             f"{result['step_time_ratio']:.2f}")]


if __name__ == "__main__":
    print(json.dumps(run(small=True), indent=2))
