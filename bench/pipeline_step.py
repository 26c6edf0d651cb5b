"""Step time of DDP, FSDP and a 2-stage pipeline on one GPT and one global batch, 2 ranks, and the
pipeline's measured bubble fraction against the theoretical (p-1)/(m+p-1).

    torchrun --standalone --nproc-per-node 2 -m bench.pipeline_step ddp|fsdp|gpipe|1f1b [--small]

Every case trains the same GPT (same seed) on the same global batch of GLOBAL_BATCH sequences per
optimizer step: DDP and FSDP ranks each take half of it, both pipeline stages see all of it (the first
stage the tokens, the last the targets), cut into m microbatches. A step is forward, backward,
AdamW's step and zero_grad, timed from a barrier to a barrier; the figure is the median of STEPS
steps after WARMUP. Rank 0 prints one JSON line per case (per microbatch count for a pipeline, as
soon as it is measured, so a later hang loses nothing already measured).

The measured bubble of a pipeline, per stage s:

    bubble_s = 1 - busy_s / fwd_bwd_s

- fwd_bwd_s: the wall time of the schedule's forward and backward of the m microbatches on stage s
  (PipelineRunner.train_step, from a barrier to its return; the optimizer step is not in it), the
  median over the timed steps;
- busy_s: the time stage s's own module takes for the same m microbatches run locally, with no
  communication: stage 0 runs its forwards and a backward from a ones gradient of its output, the last
  stage runs its forwards from a random activation of the right shape that requires grad (so the input
  gradient it would send back is computed too), the loss, and its backward. The microbatches run in the
  schedule's order (GPipe: all forwards, then all backwards; 1F1B: forward and backward in turn). Timed
  right after each step on the same batch, both stages at once (as they compute at once in the
  pipeline), and the median taken over the same steps.

The reported figure is the mean of bubble_s over the stages. It is the share of a stage's step not spent
on its own computation, so beyond the idle time the theory counts it also holds the send/recv of
activations and gradients (gloo, through loopback), the schedule's bookkeeping, the loss broadcast after
the step and any imbalance between the stages (the split is balanced by parameter count, not time). On a
2-core machine with one thread per rank each stage has a core to itself only when nothing else runs:
on a loaded machine busy_s and fwd_bwd_s both stretch, not alike. busy_s is timed with both stages
computing at once, competing with the other load for the 2 cores, while in the pipeline a stage waiting
for the other leaves it a core: so under load busy_s stretches more, and the measured bubble can fall
below the theory (seen at load average 3-5). Compare figures from a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from jobs.env import RankEnv
from jobs.gpt import gpt, lm_loss
from jobs.parallel import init_distributed, parallelize
from jobs.parallel.pipeline import PipelineLayout, PipelineRunner, build_stage, split_points
from jobs.schema import ParallelConfig

MODEL = {"vocab": 256, "seq_len": 64, "dim": 384, "layers": 6, "heads": 6, "tied_embeddings": False}
SMALL = {"vocab": 256, "seq_len": 32, "dim": 64, "layers": 2, "heads": 2, "tied_embeddings": False}
GLOBAL_BATCH = 16
MICROBATCHES = (2, 4, 8)
WARMUP, STEPS = 2, 5


def batch(step: int, model_kwargs: dict) -> torch.Tensor:
    """The global batch of `step`: the same on every rank and in every case (tokens plus the next one)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, model_kwargs["vocab"], (GLOBAL_BATCH, model_kwargs["seq_len"] + 1), generator=gen)


def timed(fn: Callable[[], None]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def data_parallel_case(strategy: str, env: RankEnv, model_kwargs: dict) -> dict:
    """DDP or FSDP: each rank trains on its half of the global batch."""
    torch.manual_seed(0)
    model = parallelize(gpt(**model_kwargs), ParallelConfig(strategy=strategy, procs_per_node=env.world_size), env,
                        torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    share = GLOBAL_BATCH // env.world_size
    times = []
    for step in range(WARMUP + STEPS):
        x = batch(step, model_kwargs)[env.rank * share:(env.rank + 1) * share]

        def train() -> None:
            lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()

        times.append(timed(train))
    return {"case": strategy, "s_per_step": median_after_warmup(times), "global_batch": GLOBAL_BATCH}


def pipeline_runner(model: nn.Module, env: RankEnv, schedule: str, microbatches: int) -> PipelineRunner:
    """This rank's stage of a balanced 2-stage split and its runner: the one place the bench builds a pipeline
    (as jobs.parallel.apply.pipeline_stage and jobs.training.run do for the trainer)."""
    owned = split_points(model, None, env.world_size)
    stage = build_stage(model, env.rank, env.world_size, owned[env.rank], torch.device("cpu"))
    layout = PipelineLayout.of(env.world_size, env.rank, env.world_size).with_groups("cpu")  # no replicas
    return PipelineRunner(stage, layout, schedule, microbatches, lm_loss)


def local_work(runner: PipelineRunner, schedule: str, x: torch.Tensor, model_kwargs: dict) -> Callable[[], None]:
    """This stage's forward and backward of the batch's microbatches, run alone (see the docstring)."""
    module, m = runner.module, runner.n_microbatches
    inputs = list(x[:, :-1].chunk(m)) if runner.is_first else \
        [torch.randn(len(t), model_kwargs["seq_len"], model_kwargs["dim"], requires_grad=True) for t in x.chunk(m)]
    targets = list(x[:, 1:].chunk(m))

    def forward(i: int) -> torch.Tensor:
        out = module(inputs[i])
        return lm_loss(out, targets[i]) if runner.is_last else out

    def backward(out: torch.Tensor) -> None:
        out.backward() if runner.is_last else out.backward(torch.ones_like(out))

    def run() -> None:
        if schedule == "gpipe":
            outs = [forward(i) for i in range(m)]
            for out in outs:
                backward(out)
        else:
            for i in range(m):
                backward(forward(i))
        module.zero_grad(set_to_none=True)

    return run


def pipeline_case(schedule: str, microbatches: int, env: RankEnv, model_kwargs: dict) -> dict:
    torch.manual_seed(0)
    runner = pipeline_runner(gpt(**model_kwargs), env, schedule, microbatches)
    opt = torch.optim.AdamW(runner.module.parameters(), lr=1e-4)
    steps, fwd_bwd, busy = [], [], []
    for step in range(WARMUP + STEPS):
        x = batch(step, model_kwargs)
        dist.barrier()
        start = time.perf_counter()
        runner.train_step(x[:, :-1], x[:, 1:])
        fwd_bwd.append(time.perf_counter() - start)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        steps.append(time.perf_counter() - start)
        # right after each step, so that both see the same load from whatever else runs on the machine
        busy.append(timed(local_work(runner, schedule, x, model_kwargs)))
    mine = {"fwd_bwd_s": median_after_warmup(fwd_bwd), "busy_s": median_after_warmup(busy)}
    stages: list = [None] * env.world_size
    dist.all_gather_object(stages, mine)
    bubbles = [1 - s["busy_s"] / s["fwd_bwd_s"] for s in stages]
    p = env.world_size
    return {"case": schedule, "microbatches": microbatches, "s_per_step": median_after_warmup(steps),
            "global_batch": GLOBAL_BATCH, "stages": stages, "bubble_per_stage": bubbles,
            "bubble_measured": statistics.mean(bubbles), "bubble_theory": (p - 1) / (microbatches + p - 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["ddp", "fsdp", "gpipe", "1f1b"])
    parser.add_argument("--small", action="store_true", help="a tiny model: checks the bench runs")
    args = parser.parse_args()
    model_kwargs = SMALL if args.small else MODEL
    env = RankEnv.from_environ()
    init_distributed(env, torch.device("cpu"))
    params = sum(p.numel() for p in gpt(**model_kwargs).parameters())
    if args.case in ("ddp", "fsdp"):
        cases = [lambda: data_parallel_case(args.case, env, model_kwargs)]
    else:
        cases = [lambda m=m: pipeline_case(args.case, m, env, model_kwargs) for m in MICROBATCHES]
    for case in cases:
        result = case()
        if env.is_main:  # one line per case as it comes: a later hang keeps what is measured
            print(json.dumps({**result, "model": model_kwargs, "parameters": params}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
