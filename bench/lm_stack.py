"""The language-model performance stack on this machine (issue #26), `gpt_small` on 2 CPU ranks (gloo):

(1) tokens/s and MFU of the trainer: eager, compiled (`trainer.compile`), compiled + selective activation
    checkpointing; the variants alternate (A B C A B C) so drift in the machine's load spreads over all;
(2) peak memory per rank (the largest resident set of the 2 ranks, `peak_rss_gb`) of a deeper, longer-context
    GPT under no, full and selective (op) activation checkpointing, each in fresh processes;
(3) the trainer against a hand-written DDP loop of the same GPT: bench.ddp_overhead with this recipe.

Every figure comes from the runs' own metrics.jsonl (jobs.training.throughput), first window left out.

    python -m bench.lm_stack            (or make bench BENCH_ARGS="--only lmstack")
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SPEED = ["trainer.max_steps=70", "logging.log_every=10", "trainer.eval_every=0", "checkpoint.every_steps=0",
         "checkpoint.at_end=false", "logging.progress_bar=false", "data.kwargs.max_bytes=400000"]
VARIANTS = {"eager": [], "compiled": ["trainer.compile=true"],
            "compiled + selective AC": ["trainer.compile=true", "parallel.activation_checkpointing=selective"]}
# activations that dominate: 8 blocks of width 256 over 512 tokens, 8 sequences per micro batch
DEEP = ["model.kwargs.dim=256", "model.kwargs.layers=8", "model.kwargs.seq_len=512", "data.kwargs.seq_len=512",
        "trainer.global_batch=16", "trainer.micro_batch=8", "trainer.max_steps=4", "logging.log_every=1",
        "trainer.eval_every=0", "checkpoint.every_steps=0", "checkpoint.at_end=false", "logging.progress_bar=false",
        "data.kwargs.max_bytes=400000"]
MEMORY = {"none": [], "full": ["parallel.activation_checkpointing=full"],
          "selective (op)": ["parallel.activation_checkpointing=selective"],
          "selective (every 2nd)": ["parallel.activation_checkpointing=selective", "parallel.selective_ac=2"]}


def launch(runs: Path, name: str, overrides: list[str]) -> list[dict]:
    subprocess.run([sys.executable, "-m", "launcher", "launch", "gpt_small", *overrides, "--run-name", name,
                    "--runs-dir", str(runs)], cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "samples_per_s" in r]


def speed(rounds: int = 2) -> dict:
    per: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, overrides in VARIANTS.items():
                windows = launch(Path(tmp), f"{name.replace(' ', '')}-{r}".replace("+", "-"), SPEED + overrides)
                per[name] += windows[1:]  # the first window holds the inductor cache's warm-up and first evals
    out = {}
    for name, windows in per.items():
        out[name] = {"tokens_per_s": statistics.median(w["tokens_per_s"] for w in windows),
                     "mfu": statistics.median(w["mfu"] for w in windows if "mfu" in w),
                     "tflops_per_device": statistics.median(w["tflops_per_device"] for w in windows),
                     "windows": len(windows)}
    return out


def memory() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MEMORY.items():
            windows = launch(Path(tmp), name.replace(" ", "").replace("(", "-").replace(")", ""), DEEP + overrides)
            out[name] = {"peak_rss_gb": max(w["peak_rss_gb"] for w in windows),
                         "tokens_per_s": statistics.median(w["tokens_per_s"] for w in windows[1:])}
    return out


def overhead() -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "bench.ddp_overhead", "gpt_small"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def run() -> dict:
    results = {"speed": speed(), "memory": memory(), "overhead": overhead()}
    return {"results": results, "rows": rows(results)}


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    out = []
    s = r["speed"]
    eager = s["eager"]["tokens_per_s"]
    for name, v in s.items():
        out.append((f"gpt_small tokens/s, 2 CPU ranks: {name}", f"{v['tokens_per_s']:,.0f} tok/s",
                    f"MFU {v['mfu'] * 100:.1f}% ({v['tflops_per_device'] * 1e3:.1f} GFLOP/s per rank)",
                    f"x{v['tokens_per_s'] / eager:.2f} of eager (median of {v['windows']} windows)"))
    m = r["memory"]
    none = m["none"]["peak_rss_gb"]
    for name, v in m.items():
        out.append((f"peak RSS per rank, 8x256 GPT, 8x512 tokens: AC {name}", f"{v['peak_rss_gb']:.2f} GB",
                    f"x{v['peak_rss_gb'] / none:.2f} of none", f"{v['tokens_per_s']:,.0f} tok/s"))
    o = r["overhead"]
    out.append(("trainer vs hand-written DDP loop (gpt_small)", f"{o['trainer_s_per_step'] * 1e3:.1f} ms/step",
                f"plain {o['plain_s_per_step'] * 1e3:.1f} ms/step",
                f"ratio {o['ratio']:.3f} (goal <= 1.01; pairs {min(o['pair_ratios']):.2f}-{max(o['pair_ratios']):.2f})"))
    return out


if __name__ == "__main__":
    res = run()
    print(json.dumps(res["results"], indent=2))
    for row in res["rows"]:
        print("  ".join(row))
