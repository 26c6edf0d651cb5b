"""Run under torchrun: what the slow-rank report costs a trainer step (issue 24; goal <= 1%).

Two measures on the same ranks and process group:
- the trainer's seconds per step with the report (trainer.slow_rank_factor=1.5) against without it (0), in
  alternating A/B runs so that slow drift in the machine's load cancels (bench.ddp_overhead's way);
- the report's own work timed alone, which is below the noise of whole steps: the clock's four reads per
  step (the loader's wait, compute, sync) and, once per log interval, the all-gather of three numbers per
  rank, as a share of the step.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from bench.ddp_overhead import OVERRIDES, WINDOW, ours
from jobs import parallel
from jobs.env import RankEnv
from jobs.schema import load_recipe
from jobs.train import exit_cleanly
from jobs.training.slow_ranks import SlowRankReport

PAIRS = 6


def report_alone(iterations: int = 2000) -> float:
    """Seconds per step of the report's work: the clock around a loader's next(), at the step's start, at the
    last backward and after the optimizer every step, and an exchange every WINDOW."""
    report = SlowRankReport(1.5, torch.device("cpu"), 0)
    start = time.perf_counter()
    for step, _ in enumerate(report.clock.batches(range(iterations)), start=1):
        report.clock.start()
        report.clock.mark()
        report.clock.end()
        if step % WINDOW == 0:
            report.exchange(step)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    env = RankEnv.from_environ()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= env.local_world_size:  # one core per rank, as bench.ddp_overhead does
        os.sched_setaffinity(0, {cpus[env.local_rank]})
    name = sys.argv[1] if len(sys.argv) > 1 else "vgg_pretrain"
    common = OVERRIDES + [f"parallel.procs_per_node={env.world_size}"]
    off, on = (load_recipe(name, common + [f"trainer.slow_rank_factor={f}"]) for f in (0, 1.5))
    parallel.init_distributed(env, torch.device("cpu"), on.parallel)
    pairs = []
    for _ in range(PAIRS):  # A B A B ...
        without, with_report = ours(off, env), ours(on, env)
        if env.is_main:
            pairs.append((statistics.median(without), statistics.median(with_report)))
    alone = report_alone()
    if env.is_main:
        a, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        ratios = sorted(y / x for x, y in pairs)
        print(json.dumps({"recipe": name, "ranks": env.world_size, "without_s_per_step": a, "with_s_per_step": b,
                          "ratio": statistics.median(ratios), "pair_ratios": ratios, "report_alone_s_per_step": alone,
                          "report_share_of_step": alone / a}))
    parallel.shutdown()
    exit_cleanly()


if __name__ == "__main__":
    main()
