"""Build a Trainer from the recipe and run it: what a rank does between reading its config and
writing result.json. This is the one place that decides how the parts are laid out (today one
model part per rank: wrapped by DDP, sharded by FSDP, or one pipeline stage run by a PipelineRunner)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from jobs import flight_recorder, parallel
from jobs.data import build_datasets
from jobs.env import RankEnv
from jobs.parallel.apply import pipeline_mesh
from jobs.parallel.float8 import check_float8
from jobs.parallel.pipeline import PipelineRunner
from jobs.models import build_model, freeze, summary
from jobs.preempt import StopFlag
from jobs.pretrained import load_pretrained
from jobs.run_checkpointer import checkpointer_for
from jobs.tracking import MetricsLogger
from jobs.training.callbacks import Callback, Callbacks
from jobs.training.context import RunContext
from jobs.training.objective import Objective
from jobs.training.parts import ModelParts
from jobs.training.schedule import build_optimizers, build_schedulers, planned_steps
from jobs.training.state import RankRNG, seed_rank
from jobs.training.throughput import Throughput
from jobs.training.trainer import Trainer
from jobs.schema import RecipeConfig, StorageConfig, to_dict
from jobs.schema.run_dir import CONFIG_YAML, RunResult
from jobs.schema.secrets import redact

log = logging.getLogger("jobs.trainer")  # the name log lines have always shown


def train(recipe: RecipeConfig, run: RunContext, storage: StorageConfig, env: RankEnv, stop: StopFlag,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train this rank's share of the run (resuming it when asked); returns what result.json holds."""
    trainer = build_trainer(recipe, run, storage, env, stop, callbacks)
    try:
        if run.resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.metrics.close()
        trainer.checkpointer.close()


def build_trainer(recipe: RecipeConfig, run: RunContext, storage: StorageConfig, env: RankEnv, stop: StopFlag,
                  callbacks: Sequence[Callback] = ()) -> Trainer:
    t = recipe.trainer
    device = parallel.pick_device(t, env)
    _check_precision(t.precision, device)
    parallel.init_distributed(env, device, recipe.parallel)
    if env.distributed:  # on a hang the supervisor asks each rank for its last collectives
        flight_recorder.serve(run.run_dir, env.rank)
    _set_determinism(t.deterministic, device)
    src = str(run.run_dir / CONFIG_YAML)  # a bad import path or factory is reported against it
    objective = Objective.from_recipe(recipe, src)
    train_set, val_set = build_datasets(recipe.data, recipe.model, storage, src)
    p = recipe.parallel
    pipelined = p.strategy == "pipeline"
    model = ModelParts([parallel.parallelize(_plain_model(recipe, src, storage, env), p, env, device, t)], pipelined)
    # a pipeline stage runs through its schedule, which passes activations between the stages
    runner = PipelineRunner(model.single, pipeline_mesh(p, env, device), p.pipeline_schedule, p.microbatches,
                            objective.loss) if pipelined else None
    total = planned_steps(recipe, len(train_set), parallel.data_parallel(p, env)[0])
    optimizers = build_optimizers(recipe.optim, model)
    schedulers = build_schedulers(recipe.schedule, optimizers, total)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    # distinct dropout streams per rank; the same within a tensor-parallel group, whose ranks each hold the
    # whole residual stream and must drop the same units of it
    seed_rank(t.seed, env.rank // p.tensor_parallel)
    # a model spread over ranks is saved the same way: each rank writes its part (DCP), nothing is gathered
    sharded = env.distributed and p.strategy in ("fsdp", "pipeline")
    # nodes without a shared folder (VMs): each rank sends its own shard to the store (jobs/checkpoint/spread.py)
    spread = sharded and not run.shared_run_dir and env.world_size > env.local_world_size
    checkpointer = checkpointer_for(run, recipe, storage, is_writer=env.is_main, sharded=sharded, spread=spread)
    metrics = MetricsLogger(recipe.logging, run.run_dir, run.run_name, run.run_id, redact(to_dict(recipe)),
                            env.is_main)
    throughput = Throughput(lambda: _meta_model(recipe, src), objective.loss, t.global_batch, device, t.precision,
                            env.world_size, env.is_main)
    return Trainer(recipe=recipe, run=run, env=env, device=device, train_set=train_set, val_set=val_set,
                   total_steps=total, model=model, optimizers=optimizers, schedulers=schedulers, scaler=scaler,
                   rng=RankRNG(env, device), checkpointer=checkpointer, metrics=metrics, stop=stop,
                   objective=objective, throughput=throughput, callbacks=Callbacks(callbacks), pipeline=runner)


def _plain_model(recipe: RecipeConfig, src: str, storage: StorageConfig, env: RankEnv) -> nn.Module:
    """The model before parallelism: initialised, pretrained weights loaded, layers frozen."""
    torch.manual_seed(recipe.trainer.seed)  # identical initial weights on every rank
    model = build_model(recipe.model, src)
    if recipe.model.pretrained:
        message = load_pretrained(model, recipe.model.pretrained, recipe.model.replace_head, storage)
        if env.is_main:
            log.info("pretrained weights: %s", message)
    frozen = freeze(model, recipe.model.freeze)
    if env.is_main:
        log.info("model %s; %d tensors frozen %s", summary(model), frozen, list(recipe.model.freeze))
    return model


def _meta_model(recipe: RecipeConfig, src: str) -> nn.Module:
    """The plain model again, its layers frozen as in training (frozen weights have no gradient to count),
    for the FLOP count (built on the meta device: no pretrained weights to load)."""
    model = build_model(recipe.model, src)
    freeze(model, recipe.model.freeze)
    return model


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp8":
        check_float8(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA (GradScaler); use trainer.precision=bf16 on CPU")


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
