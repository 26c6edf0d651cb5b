"""The training loop that runs inside every rank. Read it top to bottom: `train()` builds the
pieces, resumes, then loops over optimizer steps; each step is `grad_accum` micro-steps."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from jobs import parallel
from jobs.checkpoint import Checkpointer
from jobs.data import build_datasets, ignore_stop_signals
from jobs.env import RankEnv
from jobs.models import build_model, freeze, summary
from jobs.preempt import StopFlag
from jobs.pretrained import load_pretrained
from jobs.tracking import MetricsLogger
from schema import RecipeConfig, ScheduleConfig, StorageConfig, config_hash, to_dict, to_yaml
from schema.secrets import redact

log = logging.getLogger("jobs.trainer")


@dataclass
class TrainState:
    """Progress that a checkpoint must restore for the resumed run to equal an uninterrupted one."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch (mid-epoch resume)
    best: Optional[float] = None  # best value of checkpoint.best_metric so far

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class RunInfo:
    """What the launcher wrote for this run (run.json): names and the resume policy."""

    run_dir: Path
    run_name: str
    run_id: str
    resume: bool
    checkpoint_uri: Optional[str]  # remote checkpoint folder of this run, or None for local only


@dataclass
class Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    state: TrainState


def train(recipe: RecipeConfig, run: RunInfo, storage: StorageConfig, env: RankEnv,
          stop: StopFlag) -> dict[str, Any]:
    t = recipe.trainer
    device = parallel.pick_device(t, env)
    _check_precision(t.precision, device)
    parallel.init_distributed(env, device)
    _set_determinism(t.deterministic, device)

    train_set, val_set = build_datasets(recipe.data, recipe.model)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(recipe.model)
    if recipe.model.pretrained:
        message = load_pretrained(model, recipe.model.pretrained, recipe.model.replace_head, storage)
        if env.is_main:
            log.info("pretrained weights: %s", message)
    frozen = freeze(model, recipe.model.freeze)
    if env.is_main:
        log.info("model %s; %d tensors frozen %s", summary(model), frozen, list(recipe.model.freeze))
    model = parallel.parallelize(model, recipe.parallel, env, device)
    total = _total_steps(recipe, len(train_set), env)
    parts = _build_parts(recipe, model, device, total)
    _seed_rank(t.seed, env.rank)  # distinct dropout streams per rank

    ckpt = Checkpointer(recipe.checkpoint, run.run_dir / "checkpoints", run.checkpoint_uri, storage,
                        is_writer=env.is_main, run_id=run.run_id)
    if run.resume:
        _resume(ckpt, parts, recipe, env, device)
    metrics = MetricsLogger(recipe.logging, run.run_dir, run.run_name, run.run_id, redact(to_dict(recipe)),
                            env.is_main)
    try:
        return _loop(recipe, run, parts, (train_set, val_set, total), ckpt, metrics, env, device, stop)
    finally:
        metrics.close()
        ckpt.close()


def _loop(recipe: RecipeConfig, run: RunInfo, parts: Parts, data: tuple[Dataset, Dataset, int], ckpt: Checkpointer,
          metrics: MetricsLogger, env: RankEnv, device: torch.device, stop: StopFlag) -> dict[str, Any]:
    t, accum, st = recipe.trainer, recipe.grad_accum, parts.state
    train_set, val_set, total = data
    sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=t.seed, drop_last=True)
    steps_per_epoch = len(sampler) // (t.micro_batch * accum)
    if env.is_main:
        log.info("%d ranks x micro batch %d x %d accumulation = global batch %d; %d steps/epoch, %d steps",
                 env.world_size, t.micro_batch, accum, t.global_batch, steps_per_epoch, total)
    progress = _progress(recipe, total, st.step, env)
    last_save, loss_sum, loss_n, window_start = time.monotonic(), torch.zeros((), device=device), 0, time.perf_counter()
    last_eval: dict[str, float] = {}
    outcome, first_step = "completed", True
    agreement = _Agreement(device)
    while st.step < total:
        sampler.set_epoch(st.epoch)  # a fresh shuffle every epoch, the same on every rank
        for micro in _micro_batches(train_set, sampler, st.step_in_epoch, steps_per_epoch, t.micro_batch, accum,
                                    recipe.data.num_workers):
            loss_sum += _train_step(parts, micro, recipe, device)
            loss_n += 1
            if first_step and env.is_main:  # process start to first step: the launch benchmark reads this
                (run.run_dir / "first_step.json").write_text(json.dumps({"time": time.time(), "step": st.step + 1}))
            first_step = False
            st.step += 1
            st.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            if st.step % recipe.logging.log_every == 0 or st.step == total:
                _log_train(metrics, parts, st, loss_sum, loss_n, time.perf_counter() - window_start, t.global_batch)
                loss_sum, loss_n, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            if t.eval_every and st.step % t.eval_every == 0:
                last_eval = _evaluate_and_log(parts.model, val_set, recipe, env, device, metrics, st.step)
            preempted, time_due = agreement.exchange(stop.requested, _time_due(recipe, last_save))
            if preempted or _step_due(recipe, st.step) or time_due:
                _save(ckpt, parts, recipe, run, env, last_eval)
                last_save = time.monotonic()
            if preempted:
                outcome = "preempted"
                break
            if st.step >= total:
                break
        if outcome == "preempted":
            break
        if st.step_in_epoch >= steps_per_epoch:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
            if not t.eval_every:
                last_eval = _evaluate_and_log(parts.model, val_set, recipe, env, device, metrics, st.step)
    agreement.drain()
    if progress is not None:
        progress.close()
    return _finish(outcome, recipe, run, parts, ckpt, env, device, val_set, metrics, last_eval, stop)


def _finish(outcome: str, recipe: RecipeConfig, run: RunInfo, parts: Parts, ckpt: Checkpointer, env: RankEnv,
            device: torch.device, val_set: Dataset, metrics: MetricsLogger, last_eval: dict[str, float],
            stop: StopFlag) -> dict[str, Any]:
    st = parts.state
    if outcome == "completed":
        if not last_eval or last_eval.get("_step") != st.step:
            last_eval = _evaluate_and_log(parts.model, val_set, recipe, env, device, metrics, st.step)
        if recipe.checkpoint.at_end and (not recipe.checkpoint.every_steps or st.step % recipe.checkpoint.every_steps):
            _save(ckpt, parts, recipe, run, env, last_eval)
    committed = ckpt.flush(recipe.checkpoint.flush_timeout_s) if env.is_main else True
    result = {"outcome": outcome, "step": st.step, "epoch": st.epoch, "signal": stop.signal_name,
              "checkpoints_committed": committed,
              **{k: v for k, v in last_eval.items() if not k.startswith("_")}}
    if env.is_main:
        if outcome == "completed":
            torch.save(parallel.unwrap(parts.model).state_dict(), run.run_dir / "model.pt")
        tmp = run.run_dir / f".result.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(run.run_dir / "result.json")  # `launcher status` never reads half a file
        log.info("%s at step %d: %s", outcome, st.step,
                 ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items() if not k.startswith("_")))
    return result


# ----------------------------------------------------------------------------- building
def _build_parts(recipe: RecipeConfig, model: nn.Module, device: torch.device, total_steps: int) -> Parts:
    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    if o.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,
                                                           nesterov=o.nesterov, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe.schedule, total_steps))
    scaler = torch.amp.GradScaler("cuda") if recipe.trainer.precision == "fp16" else None
    return Parts(model, optimizer, scheduler, scaler, TrainState())


def _lr_lambda(s: ScheduleConfig, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        after = step - s.warmup_steps
        if s.name == "cosine":
            progress = min(1.0, after / max(1, total_steps - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "step":
            return s.gamma ** (after // s.step_size)
        return 1.0
    return factor


def _total_steps(recipe: RecipeConfig, n_train: int, env: RankEnv) -> int:
    t = recipe.trainer
    if t.max_steps is not None:
        return t.max_steps
    per_rank = n_train // env.world_size
    steps_per_epoch = per_rank // (t.micro_batch * recipe.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training samples make no full step of global batch {t.global_batch}: "
                         "lower trainer.global_batch")
    return (t.epochs or 1) * steps_per_epoch


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA (GradScaler); use trainer.precision=bf16 on CPU")


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + 1000 * (rank + 1))


# ----------------------------------------------------------------------------- one step
def _micro_batches(dataset: Dataset, sampler: DistributedSampler, skip_steps: int, steps: int, micro: int,
                   accum: int, workers: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield the remaining optimizer steps of this epoch as lists of `accum` micro-batches; skipping
    at the index level puts a resumed run on exactly the samples the interrupted one would have seen."""
    per_step = micro * accum
    indices = list(sampler)[skip_steps * per_step: steps * per_step]
    # An own generator: creating a loader must not draw from the global RNG, or a resumed run's
    # dropout stream would drift from the uninterrupted run's.
    gen = torch.Generator().manual_seed(len(indices) * 7919 + skip_steps)
    loader = DataLoader(dataset, batch_size=micro, sampler=indices, num_workers=workers, drop_last=False,
                        generator=gen, worker_init_fn=ignore_stop_signals)
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def _train_step(parts: Parts, micro: list[tuple[torch.Tensor, torch.Tensor]], recipe: RecipeConfig,
                device: torch.device) -> torch.Tensor:
    model, opt, scaler, t = parts.model, parts.optimizer, parts.scaler, recipe.trainer
    model.train()
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = i == len(micro) - 1
        # All-reduce gradients once per optimizer step: skip DDP's sync on every micro-step but the last.
        sync = model.no_sync() if (not last and isinstance(model, nn.parallel.DistributedDataParallel)) \
            else contextlib.nullcontext()
        with sync:
            with _autocast(t.precision, device):
                loss = F.cross_entropy(model(x), y) / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(opt)
    if t.grad_clip is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    parts.scheduler.step()
    return total


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- evaluation and logging
def evaluate(model: nn.Module, dataset: Dataset, batch: int, env: RankEnv, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """Loss and accuracy over the whole validation set, each sample counted once across ranks."""
    model.eval()
    shard = list(range(env.rank, len(dataset), env.world_size))  # no padding: no sample counted twice
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch, sampler=shard, generator=torch.Generator()):
            x, y = x.to(device), y.to(device)
            with _autocast(precision, device):
                logits = parallel.unwrap(model)(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.numel()
    sums = parallel.all_reduce_sum(sums)
    return {"val/loss": (sums[0] / sums[2]).item(), "val/acc": (sums[1] / sums[2]).item()}


def _evaluate_and_log(model: nn.Module, val_set: Dataset, recipe: RecipeConfig, env: RankEnv,
                      device: torch.device, metrics: MetricsLogger, step: int) -> dict[str, float]:
    result = evaluate(model, val_set, recipe.trainer.micro_batch * 4, env, device, recipe.trainer.precision)
    metrics.log(step, result)
    if env.is_main:
        log.info("step %d: val/loss %.4f val/acc %.4f", step, result["val/loss"], result["val/acc"])
    return {**result, "_step": step}


def _log_train(metrics: MetricsLogger, parts: Parts, st: TrainState, loss_sum: torch.Tensor, n: int,
               seconds: float, global_batch: int) -> None:
    loss = parallel.all_reduce_mean(loss_sum.detach().clone().float()).item() / max(1, n)
    lr = parts.optimizer.param_groups[0]["lr"]
    metrics.log(st.step, {"train/loss": loss, "lr": lr, "epoch": st.epoch,
                          "samples_per_s": n * global_batch / max(seconds, 1e-9)})
    if metrics.enabled and not sys.stderr.isatty():
        log.info("step %d epoch %d: train/loss %.4f lr %.3g", st.step, st.epoch, loss, lr)


def _progress(recipe: RecipeConfig, total: int, done: int, env: RankEnv) -> Any:
    if not (env.is_main and recipe.logging.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=recipe.name, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- checkpoints
class _Agreement:
    """How ranks agree on stopping (a signal) and on time-based saves without a blocking collective
    per step: each step starts an asynchronous MAX all-reduce of this rank's flags and acts on the
    previous step's result, which every rank sees identically. The collective's latency hides
    behind the next step's compute; the price is acting one step later."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.distributed = torch.distributed.is_initialized()
        self._pending: Optional[tuple[Any, torch.Tensor]] = None

    def exchange(self, stop_requested: bool, time_due: bool) -> tuple[bool, bool]:
        if not self.distributed:
            return stop_requested, time_due
        flags = torch.tensor([float(stop_requested), float(time_due)], device=self.device)
        work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, flags)
        if previous is None:
            return False, False
        previous[0].wait()
        return bool(previous[1][0]), bool(previous[1][1])

    def drain(self) -> None:
        """Finish the collective still in flight so every rank leaves the loop with none pending."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _step_due(recipe: RecipeConfig, step: int) -> bool:
    every = recipe.checkpoint.every_steps
    return bool(every) and step % every == 0


def _time_due(recipe: RecipeConfig, last_save: float) -> bool:
    minutes = recipe.checkpoint.every_minutes
    return bool(minutes) and time.monotonic() - last_save >= minutes * 60


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _gather_rng(env: RankEnv, device: torch.device) -> list[dict[str, Any]]:
    mine = _rng_state(device)
    if not torch.distributed.is_initialized():
        return [mine]
    everyone: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _save(ckpt: Checkpointer, parts: Parts, recipe: RecipeConfig, run: RunInfo, env: RankEnv,
          last_eval: dict[str, float]) -> None:
    rngs = _gather_rng(env, next(parts.model.parameters()).device)  # a collective: every rank calls it
    if not env.is_main:
        return
    best_key = recipe.checkpoint.best_metric
    st = parts.state
    if best_key and best_key in last_eval:
        better = max if recipe.checkpoint.best_mode == "max" else min
        st.best = last_eval[best_key] if st.best is None else better(st.best, last_eval[best_key])
    state = {
        "model": parallel.unwrap(parts.model).state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "trainer": st.state_dict(),
        "rng": rngs,
        "meta": {"config": to_yaml(recipe, redacted=True),  # read by people: credentials masked
                 "config_hash": config_hash(recipe), "run_id": run.run_id,
                 "world_size": env.world_size, "metrics": {k: v for k, v in last_eval.items() if k[0] != "_"}},
    }
    if parts.scaler is not None:
        state["scaler"] = parts.scaler.state_dict()
    ckpt.save(st.step, state, {k: v for k, v in last_eval.items() if not k.startswith("_")})


def _resume(ckpt: Checkpointer, parts: Parts, recipe: RecipeConfig, env: RankEnv, device: torch.device) -> None:
    # Rank 0 picks (skipping corrupt checkpoints as it loads them); the others load what it picked.
    loaded = ckpt.load_latest(map_location="cpu") if env.is_main else None
    found = [loaded[0] if loaded else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(found, src=0)
    if found[0] is None:
        if env.is_main:
            log.info("no committed checkpoint: starting from step 0")
        return
    state = loaded[1] if loaded else ckpt.load(found[0], map_location="cpu")
    parallel.unwrap(parts.model).load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and "scaler" in state:
        parts.scaler.load_state_dict(state["scaler"])
    parts.state.load_state_dict(state["trainer"])
    meta = state["meta"]
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        _set_rng_state(rngs[env.rank], device)
    elif env.is_main:
        log.warning("checkpoint was written by %d ranks, now %d: RNG streams restart (data order is kept)",
                    len(rngs), env.world_size)
    if env.is_main:
        changed = " (config changed since: %s)" % meta["config_hash"] if meta["config_hash"] != config_hash(recipe) else ""
        log.info("resumed from %s: step %d, epoch %d, step %d in epoch%s", found[0], parts.state.step,
                 parts.state.epoch, parts.state.step_in_epoch, changed)
