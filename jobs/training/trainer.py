"""The Trainer: one rank's stateful parts (model parts, optimizers, LR schedule, gradient scaler,
progress, RNG streams), the loop over optimizer steps, and a checkpoint of all of it as one state
dict. `run.build_trainer()` builds the parts; a model-parallel layout changes only that."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from jobs import parallel
from jobs.checkpoint import Checkpointer
from jobs.checkpoint.sharded import load_shards
from jobs.env import RankEnv
from jobs.preempt import StopFlag
from jobs.tracking import MetricsLogger
from jobs.training import batch as batching
from jobs.training.agreement import StopAgreement
from jobs.training.callbacks import Callbacks
from jobs.training.context import RunContext
from jobs.parallel.pipeline import PipelineRunner
from jobs.training.evaluate import EvalResult, evaluate, evaluate_pipeline
from jobs.training.objective import Objective
from jobs.training.parts import LRSchedulers, ModelParts, Optimizers
from jobs.training.state import RankRNG, TrainState
from jobs.training.memory import DoesNotFit, release
from jobs.training.probe import find_micro_batch
from jobs.training.slow_ranks import SlowRankReport
from jobs.training.throughput import Throughput, line as speed_line
from jobs.training.step import LossWindow, MicroBatches, StepOutOfMemory, StepSettings, micro_batches, \
    pipeline_train_step, resplit, train_step
from jobs.schema import RecipeConfig, config_hash, to_yaml
from jobs.schema.run_dir import FINAL_MODEL, Run, RunResult

log = logging.getLogger("jobs.trainer")  # the name log lines have always shown


@dataclass(eq=False)
class Trainer:
    """Everything one rank trains with. The parts (model, optimizers, schedulers, scaler, progress,
    rng) are what state_dict() saves; the rest is configuration and where results go."""

    recipe: RecipeConfig
    run: RunContext
    env: RankEnv
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    total_steps: int  # optimizer steps of the whole run
    model: ModelParts
    optimizers: Optimizers
    schedulers: LRSchedulers
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    rng: RankRNG
    checkpointer: Checkpointer
    metrics: MetricsLogger
    stop: StopFlag
    objective: Objective  # the loss trained on and the metrics evaluated
    throughput: Throughput  # samples and tokens/s, TFLOP/s, MFU, peak memory of each log window
    callbacks: Callbacks = field(default_factory=Callbacks)
    pipeline: Optional[PipelineRunner] = None  # parallel.strategy=pipeline: runs this rank's stage
    progress: TrainState = field(default_factory=TrainState)
    last_eval: Optional[EvalResult] = None
    pruned: bool = False  # a callback asked to end the run after an evaluation (rank 0's answer, on every rank)
    batch: Optional[batching.BatchPlan] = None  # the split of a replica's batch in use (set by fit())
    _batch_record: Optional[dict[str, Any]] = field(init=False, default=None)  # trainer.micro_batch=auto
    _slow: Optional[SlowRankReport] = field(init=False, default=None)  # the slow-rank report (set by fit())

    @property
    def settings(self) -> StepSettings:
        micro = self.batch.micro if self.batch is not None else self.recipe.trainer.micro_batch
        micro = micro if isinstance(micro, int) else 32  # before an auto search: nothing is evaluated then
        return StepSettings(self.recipe.trainer, self.device, self.objective, eval_batch=4 * micro,
                            clock=self._slow.clock if self._slow is not None else None)

    @property
    def auto_batch(self) -> bool:
        """trainer.micro_batch=auto: searched before the first step, lowered on an out-of-memory error."""
        return self.recipe.trainer.micro_batch == "auto" and self.pipeline is None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a whole checkpoint holds, one file per key. A collective (the RNG streams are gathered,
        an FSDP model and pipeline stages too): every rank calls it; Checkpointer.save() writes it on
        rank 0 only."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizers.state_dict(), **self._small_state()}

    def shard_state(self) -> dict[str, Any]:
        """This rank's model and optimizer state in a sharded checkpoint (DCP writes and reshards it)."""
        return {"model": self.model.shard_state(), "optimizer": self.optimizers.shard_state()}

    def _small_state(self) -> dict[str, Any]:
        """Everything but the model and optimizer: written by rank 0 in either kind of checkpoint."""
        state = {
            "scheduler": self.schedulers.state_dict(),
            "trainer": self.progress.state_dict(),
            "rng": self.rng.state_dict(),
            "meta": {"config": to_yaml(self.recipe, redacted=True),  # read by people: credentials masked
                     "config_hash": _config_hash(self.recipe), "run_id": self.run.run_id,
                     "world_size": self.env.world_size, "metrics": self._eval_metrics(),
                     "layout": {**self._layout(), "sharded": self.checkpointer.sharded}},
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], shards_at: Optional[str] = None, reader: Any = None) -> None:
        """The inverse of state_dict() ("meta" is only read by people and resume()'s log line). A sharded
        checkpoint's state has no model or optimizer: they are read from the shards at `shards_at` into
        this layout (a collective), whatever layout wrote them."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizers.load_state_dict(state["optimizer"])
        else:
            if shards_at is None and reader is None:
                raise ValueError("a sharded checkpoint's state needs the folder of its shards")
            template = self.shard_state()
            load_shards(shards_at or "", template, reader)
            self.model.load_shard_state(template["model"])
            self.optimizers.load_shard_state(template["optimizer"])
        self.schedulers.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["trainer"])
        self.rng.load_state_dict(state["rng"])

    def save(self) -> None:
        """Checkpoint the current step. Every rank calls it (the state is gathered, or each rank
        writes its shard). The checkpointer's policy says what the best value so far is."""
        metrics = self._eval_metrics()
        self.progress.best = self.checkpointer.policy.best_after(self.progress.best, metrics)
        if self.checkpointer.sharded:
            self.checkpointer.save(self.progress.step, self._small_state(), metrics, shards=self.shard_state())
        else:
            self.checkpointer.save(self.progress.step, self.state_dict(), metrics)

    def resume(self) -> None:
        """Continue from the newest committed checkpoint, if there is one."""
        if self.checkpointer.spread:  # nodes without a shared folder: each reads its shards from the store
            loaded: dict[str, Any] = {}

            def apply(state: dict[str, Any], reader: Any) -> None:
                self.load_state_dict(state, reader=reader)
                loaded.update(state)
            self._say_resumed(self.checkpointer.resume_spread(apply), loaded.get("meta"))
            return
        # Rank 0 picks (skipping corrupt checkpoints as it loads them); the others load what it picked.
        # Nodes that cannot read rank 0's folder (VMs) load the remote copy it picked among the remote ones.
        remote_only = not self.run.shared_run_dir and self.env.world_size > self.env.local_world_size
        loaded = self.checkpointer.load_latest(map_location="cpu", remote_only=remote_only) if self.env.is_main \
            else None
        found = [loaded[0] if loaded else None]
        if dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            self._say_resumed(None, None)
            return
        # Rank 0 hashed every file while loading; of the other ranks, one per node hashes local files (a
        # shared folder is the same bytes for its node-mates) and the rest check sizes. Downloads are always hashed.
        # a remote sharded checkpoint is read from this node's copy (made once per node: VMs share no folder)
        here = self.checkpointer.local_copy(found[0])
        state = loaded[1] if loaded else self.checkpointer.load(here, map_location="cpu",
                                                                 hash_local=self.env.local_rank == 0)
        self.load_state_dict(state, here)
        self._say_resumed(found[0], state["meta"])

    def _say_resumed(self, found: Optional[str], meta: Optional[dict[str, Any]]) -> None:
        """Rank 0's line on what the run resumed from (or that it starts from step 0)."""
        if not self.env.is_main:
            return
        if found is None or meta is None:
            log.info("no committed checkpoint: starting from step 0")
            return
        saved_hash, st = meta["config_hash"], self.progress
        changed = " (config changed since: %s)" % saved_hash if saved_hash != _config_hash(self.recipe) else ""
        log.info("resumed from %s: step %d, epoch %d, step %d in epoch%s%s", found, st.step, st.epoch,
                 st.step_in_epoch, changed, self._layout_change(meta))

    def _layout_change(self, meta: dict[str, Any]) -> str:
        """How the checkpoint's layout differs from this run's, for the resume log line ("" if it does not)."""
        saved = meta.get("layout") or {"strategy": "ddp", "world_size": meta.get("world_size"), "sharded": False}
        now = self._layout()
        if (saved.get("strategy"), saved.get("world_size")) == (now["strategy"], now["world_size"]):
            return ""
        how = "resharded by DCP" if saved.get("sharded") else "the whole state loaded, each rank keeping its part"
        return (f"; written by {saved.get('strategy')} on {saved.get('world_size')} ranks, resumed as "
                f"{now['strategy']} on {now['world_size']}: {how}")

    def _layout(self) -> dict[str, Any]:
        p = self.recipe.parallel  # "fsdp x tp2": FSDP over tensor-parallel groups of 2 ranks
        strategy = p.strategy + (f" x tp{p.tensor_parallel}" if p.tensor_parallel > 1 else "")
        return {"strategy": strategy if self.env.distributed else "single", "world_size": self.env.world_size}

    # ------------------------------------------------------------------ the batch split
    def _plan_batch(self, replicas: int) -> str:
        """Set self.batch: the recipe's, or under auto the run's record or a search. Returns how it was
        chosen, for the start line."""
        if not self.auto_batch:
            self.batch = batching.fixed_plan(self.recipe, replicas)
            return ""
        per_replica = self.recipe.replica_batch
        record = batching.shared_record(self.run.run_dir, self.env.is_main)
        plan = batching.recorded_plan(record, per_replica, replicas)
        if plan is not None:
            self.batch, self._batch_record = plan, record
            return f" (auto: the run's record {batching.RECORD}, not searched again)"
        best, tried = find_micro_batch(self.model.single, self.optimizers, self.train_set, self.settings, per_replica)
        if best is None:
            raise DoesNotFit([], "the micro batch search before step 1")
        self.batch = batching.BatchPlan(best, per_replica // best, replicas)
        self._batch_record = batching.new_record(self.batch, tried)
        if self.env.is_main:
            batching.write_record(self.run.run_dir, self._batch_record)
        shown = ", ".join(f"{m} {'fits' if ok else 'does not'}" for m, ok in tried)
        return f" (auto: searched {shown}; {int(batching.MARGIN * 100)}% headroom)"

    def _lower_batch(self, ranks: list[int]) -> None:
        """After an out-of-memory error on `ranks` (every rank calls it, with the same ranks)."""
        before, step = self.batch, self.progress.step + 1
        lower = before.lowered()
        if lower is None:
            raise DoesNotFit(ranks, f"step {step}")
        release(self.device)
        self.batch = lower
        if self.env.is_main:
            log.warning("out of memory at step %d on rank(s) %s: %s -> %s (global batch kept); the step is "
                        "redone from its first micro-batch", step, ", ".join(map(str, ranks)), before.line(),
                        lower.line())
            self._batch_record = batching.lowered_record(self._batch_record or batching.new_record(before, []),
                                                         lower, step, ranks, before.micro)
            batching.write_record(self.run.run_dir, self._batch_record)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunResult:
        """Train to total_steps or until the ranks agree to stop; returns what result.json holds."""
        t, st = self.recipe.trainer, self.progress
        replicas, replica = parallel.data_parallel(self.recipe.parallel, self.env)  # a pipeline's stages: 1, 0
        sampler = DistributedSampler(self.train_set, num_replicas=replicas, rank=replica, shuffle=True, seed=t.seed,
                                     drop_last=True)
        how = self._plan_batch(replicas)
        steps_per_epoch = len(sampler) // self.recipe.replica_batch
        if self.env.is_main:
            tp = self.recipe.parallel.tensor_parallel
            ranks = f" ({replicas} data-parallel replicas of {tp}-rank tensor-parallel groups)" if tp > 1 else ""
            if self.pipeline is not None:
                ranks = f" ({replicas} data-parallel replicas of {self.pipeline.num_stages} pipeline stages)"
            log.info("%s%s%s; %d steps/epoch, %d steps", self.batch.line(), ranks, how, steps_per_epoch,
                     self.total_steps)
        bar = _progress_bar(self.recipe, self.total_steps, st.step, self.env)
        if t.slow_rank_factor and self.env.distributed and self.recipe.parallel.strategy == "ddp":
            self._slow = SlowRankReport(t.slow_rank_factor, self.device, st.step)
        window, agreement = LossWindow(self.device), StopAgreement()
        self.checkpointer.policy.restart_clock()  # every_minutes counts from the first step
        self.throughput.restart_clock()
        preempted = False
        while st.step < self.total_steps and not (preempted or self.pruned):
            sampler.set_epoch(st.epoch)  # a fresh shuffle every epoch, the same on every rank
            plan = self.batch
            steps = micro_batches(self.train_set, sampler, st.step_in_epoch, steps_per_epoch, plan.micro, plan.accum,
                                  self.recipe.data.num_workers)
            for micro in steps if self._slow is None else self._slow.clock.batches(steps):  # times the wait
                preempted = self._step(micro, window, agreement, bar)
                if preempted or self.pruned or st.step >= self.total_steps or self.batch != plan:
                    break  # a lowered micro batch: the rest of the epoch is loaded again in the new size
            if not (preempted or self.pruned) and st.step_in_epoch >= steps_per_epoch:
                st.epoch, st.step_in_epoch = st.epoch + 1, 0
                if not t.eval_every:
                    self._evaluate()
        agreement.drain()
        if bar is not None:
            bar.close()
        return self._finish("preempted" if preempted else "pruned" if self.pruned else "completed")

    def _step(self, micro: MicroBatches, window: LossWindow, agreement: StopAgreement, bar: Any) -> bool:
        """One optimizer step and what is due after it; True when the ranks agreed to stop."""
        t, st = self.recipe.trainer, self.progress
        if self.pipeline is not None:
            window.add(pipeline_train_step(self.pipeline, self.optimizers, micro, self.settings))
        else:
            window.add(self._train_step(micro))
        self.throughput.step_done(micro)
        self.schedulers.step()
        st.step += 1
        st.step_in_epoch += 1
        self.callbacks.on_step_end(st)
        if bar is not None:
            bar.update(1)
        if st.step % self.recipe.logging.log_every == 0 or st.step == self.total_steps:
            self._log_train(window)
        if t.eval_every and st.step % t.eval_every == 0:
            self._evaluate()
            if self.pruned:
                return False
        policy = self.checkpointer.policy  # when to save is the checkpointer's call; the ranks agree on time
        preempted, time_due = agreement.exchange(self.stop.requested, policy.due_by_time())
        if policy.due_after_step(st.step, preempted, time_due):
            self.save()
        return preempted

    def _train_step(self, micro: MicroBatches) -> torch.Tensor:
        """One optimizer step; under trainer.micro_batch=auto an out-of-memory error on any rank lowers the
        micro batch on every rank and the step is redone from its first micro-batch, with the same samples
        and the same random numbers (the dropout masks of a smaller split)."""
        if not self.auto_batch:
            return train_step(self.model, self.optimizers, self.scaler, micro, self.settings)
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        while True:
            try:
                return train_step(self.model, self.optimizers, self.scaler, micro, self.settings, guard=True)
            except StepOutOfMemory as oom:
                ranks = oom.ranks
            self.optimizers.zero_grad()  # the partial gradients of the failed try
            parallel.abandon_backward(self.model.single)
            self._lower_batch(ranks)
            micro = resplit(micro, self.batch.micro)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], self.device)

    def _finish(self, outcome: str) -> RunResult:
        st = self.progress
        if outcome == "completed":
            if self.last_eval is None or self.last_eval.step != st.step:
                self._evaluate()
            if self.checkpointer.policy.due_at_end(st.step):
                self.save()
        committed = self.checkpointer.flush() if self.env.is_main else True  # checkpoint.flush_timeout_s
        result = RunResult(outcome=outcome, step=st.step, epoch=st.epoch, signal=self.stop.signal_name,
                           checkpoints_committed=committed, metrics=self._eval_metrics())
        final = self.model.state_dict() if outcome == "completed" else None  # a collective with FSDP
        if self.env.is_main:
            if final is not None:
                torch.save(final, self.run.run_dir / FINAL_MODEL)
            Run.at(self.run.run_dir).write_result(result)
            log.info("%s at step %d: %s", outcome, st.step, self.last_eval.line() if self.last_eval else "")
        return result

    # ------------------------------------------------------------------ evaluation and logging
    def _evaluate(self) -> None:
        step = self.progress.step
        replicas = parallel.data_parallel(self.recipe.parallel, self.env)
        metrics = evaluate(self.model.single, self.val_set, replicas, self.settings) if self.pipeline is None \
            else evaluate_pipeline(self.pipeline, self.val_set, self.settings)
        self.metrics.log(step, metrics)
        if self.env.is_main:  # e.g. "val/loss 0.1234 val/acc 0.9700"
            log.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.last_eval = EvalResult(step, metrics)
        self.pruned = parallel.broadcast_flag(self.callbacks.on_evaluate(self.progress, metrics))

    def _eval_metrics(self) -> dict[str, float]:
        return dict(self.last_eval.metrics) if self.last_eval is not None else {}

    def _log_train(self, window: LossWindow) -> None:
        st, speed = self.progress, self.throughput.metrics()
        loss = parallel.all_reduce_mean(window.loss_sum.detach().clone().float()).item() / max(1, window.steps)
        lr = self.optimizers.lr
        self.metrics.log(st.step, {"train/loss": loss, "lr": lr, "epoch": st.epoch, **speed, **self._slow_ranks()})
        if self.metrics.enabled and not sys.stderr.isatty():
            log.info("step %d epoch %d: train/loss %.4f lr %.3g%s", st.step, st.epoch, loss, lr, speed_line(speed))
        window.reset()

    def _slow_ranks(self) -> dict[str, float]:
        """Every rank's compute, data and sync seconds per step since the last report, for metrics.jsonl; a
        WARNING (and run.json's slow_rank, which `launcher status` shows) about each slow one
        (jobs.training.slow_ranks)."""
        found = self._slow.exchange(self.progress.step) if self._slow is not None else None
        if found is None or not self.env.is_main:
            return {}
        per_rank, slow = found
        for rank in slow:
            log.warning("%s", rank.line())
        if slow:
            Run.at(self.run.run_dir).update(slow_rank="; ".join(rank.line() for rank in slow))
        return {f"{kind}_s/rank{rank}": round(getattr(split, kind), 6) for kind in ("compute", "data", "sync")
                for rank, split in enumerate(per_rank)}


def _progress_bar(recipe: RecipeConfig, total: int, done: int, env: RankEnv) -> Any:
    if not (env.is_main and recipe.logging.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=recipe.name, unit="step", dynamic_ncols=True)


def _config_hash(recipe: RecipeConfig) -> str:
    """The recipe's hash but for its number of nodes: a run resumed on the VMs that came back (vms.min_nodes)
    or grown back to all of them runs the same config."""
    return config_hash(recipe.on_nodes(1))
