"""Run under torchrun: the trainer's time per step against a hand-written DDP loop on the same
model, data and ranks, alternating A/B blocks in one process group so both see the same machine."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from jobs import parallel
from jobs.data import build_datasets
from jobs.env import RankEnv
from jobs.models import build_model
from jobs.preempt import StopFlag
from jobs.train import exit_cleanly
from jobs.checkpoint.policy import SavePolicy
from jobs.training.agreement import StopAgreement
from jobs.training.context import RunContext
from jobs.training.objective import Objective
from jobs.training.run import train
from jobs.training.schedule import lr_multiplier
from jobs.schema import RecipeConfig, StorageConfig, load_recipe

STEPS, WINDOW = 70, 10
PAIRS = 6
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.epochs=null", "checkpoint.every_steps=0",
             "checkpoint.at_end=false", f"logging.log_every={WINDOW}", "logging.progress_bar=false",
             "trainer.eval_every=1000000"]  # eval only after the loop
NO_DROPOUT = {"gpt_small": "model.kwargs.dropout=0.0"}  # a model by import path takes its own kwargs


def plain_ddp(recipe: RecipeConfig, env: RankEnv) -> list[float]:
    """The loop a user would write by hand: seconds per step for each window after the first."""
    t = recipe.trainer
    torch.manual_seed(t.seed)
    train_set, _ = build_datasets(recipe.data, recipe.model)
    model = torch.nn.parallel.DistributedDataParallel(build_model(recipe.model))
    loss_fn = Objective.from_recipe(recipe, "bench").loss  # cross-entropy; over every token for a GPT
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    sampler = DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=t.seed, drop_last=True)
    windows, step, start = [], 0, time.perf_counter()
    while step < STEPS:
        sampler.set_epoch(step)
        for x, y in DataLoader(train_set, batch_size=t.micro_batch, sampler=sampler, drop_last=True):
            loss = loss_fn(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or 1e9)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % WINDOW == 0:
                loss.item()
                windows.append((time.perf_counter() - start) / WINDOW)
                start = time.perf_counter()
            if step == STEPS:
                break
    return windows[1:]


def ours(recipe: RecipeConfig, env: RankEnv) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        if env.world_size > 1:
            box = [tmp if env.is_main else None]
            dist.broadcast_object_list(box)
            run_dir = Path(box[0])
        run = RunContext(run_dir, "bench", "bench", resume=False, checkpoint_uri=None)
        train(recipe, run, StorageConfig(), env, StopFlag())
        if env.world_size > 1:
            dist.barrier()
        if not env.is_main:
            return []
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        per_step = [recipe.trainer.global_batch / x["samples_per_s"] for x in lines if "samples_per_s" in x]
        return per_step[1:]


def trainer_extras(recipe: RecipeConfig, env: RankEnv, iterations: int = 500) -> float:
    """Seconds per step of what the trainer does beyond the hand-written loop (stop/save agreement,
    LR schedule, step and time checks, train mode), timed alone: the noise-free part of the ratio."""
    model = build_model(recipe.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(recipe.schedule, 1000))
    agreement, policy = StopAgreement(), SavePolicy(recipe.checkpoint)
    start = time.perf_counter()
    for step in range(iterations):
        model.train()
        agreement.exchange(False, policy.due_by_time())
        policy.due_at_step(step)
        sched.step()
    agreement.drain()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    env = RankEnv.from_environ()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= env.local_world_size:  # one core per rank: less scheduler noise, for both loops alike
        os.sched_setaffinity(0, {cpus[env.local_rank]})
    recipe_name = sys.argv[1] if len(sys.argv) > 1 else "vgg_pretrain"
    recipe = load_recipe(recipe_name, OVERRIDES + [NO_DROPOUT.get(recipe_name, "model.dropout=0"),
                                                   f"parallel.procs_per_node={env.world_size}"])
    parallel.init_distributed(env, torch.device("cpu"))
    pairs = []
    for _ in range(PAIRS):  # A B A B ...: each ratio compares neighbours, so slow drift in load cancels
        plain, mine = plain_ddp(recipe, env), ours(recipe, env)
        if env.is_main:
            pairs.append((statistics.median(plain), statistics.median(mine)))
    extras = trainer_extras(recipe, env)
    if env.is_main:
        p, m = statistics.median(x[0] for x in pairs), statistics.median(x[1] for x in pairs)
        ratios = sorted(b / a for a, b in pairs)
        print(json.dumps({"recipe": recipe_name, "ranks": env.world_size, "plain_s_per_step": p,
                          "trainer_s_per_step": m, "ratio": statistics.median(ratios), "pair_ratios": ratios,
                          "trainer_extras_s_per_step": extras, "extras_share_of_plain_step": extras / p}))
    parallel.shutdown()
    exit_cleanly()  # as a rank of a real run ends: gloo sometimes aborts in the interpreter's C++ teardown


if __name__ == "__main__":
    main()
