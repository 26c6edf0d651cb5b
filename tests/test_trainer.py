"""Tier 1: the Trainer and its stateful parts, in-process on one rank (no process group)."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from jobs.env import RankEnv
from jobs.preempt import StopFlag
from jobs.training.callbacks import FirstStepMarker
from jobs.training.context import RunContext
from jobs.training.parts import LRSchedulers, ModelParts, Optimizers
from jobs.training.run import build_trainer, train
from jobs.training.schedule import lr_multiplier
from jobs.training.state import TrainState
from jobs.schema import ScheduleConfig, StorageConfig, load_recipe

ONE_RANK = RankEnv.from_environ({})
# digits keeps dropout on, so an exact resume needs the RNG streams; 22 steps per epoch on one rank
QUICK = ["parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=30", "checkpoint.every_steps=0",
         "checkpoint.at_end=false", "logging.progress_bar=false", "logging.log_every=5"]


@pytest.fixture(autouse=True)
def _nondeterministic_after() -> Iterator[None]:
    yield
    torch.use_deterministic_algorithms(False)  # the trainer sets it process-wide


def _context(run_dir: Path, resume: bool = False) -> RunContext:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir, run_dir.name, "run-id", resume=resume, checkpoint_uri=None)


def _split_model() -> tuple[nn.Module, list[nn.Module]]:
    """A model and the same modules as two parts, as pipeline stages keep their names."""
    torch.manual_seed(0)
    whole = nn.Sequential(OrderedDict(a=nn.Linear(4, 3), act=nn.ReLU(), b=nn.Linear(3, 2)))
    return whole, [nn.Sequential(OrderedDict(a=whole.a)), nn.Sequential(OrderedDict(b=whole.b))]


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _step(model: nn.Module, optimizers: list[torch.optim.Optimizer], seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(5, 4)).square().sum().backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def test_two_parts_save_what_one_model_and_one_optimizer_save() -> None:
    whole, parts = _split_model()
    model = ModelParts(parts)
    optimizers = Optimizers([_sgd(list(p.parameters())) for p in parts])
    reference, _ = _split_model()
    single = _sgd(list(reference.parameters()))
    for seed in range(2):
        _step(whole, list(optimizers), seed)
        _step(reference, [single], seed)
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    saved, wanted = optimizers.state_dict(), single.state_dict()
    # One torch optimizer state dict: the parts' groups in turn, parameter ids running on across them.
    assert [i for g in saved["param_groups"] for i in g["params"]] == wanted["param_groups"][0]["params"]
    assert saved["state"].keys() == wanted["state"].keys()
    assert all(torch.equal(saved["state"][i]["momentum_buffer"], wanted["state"][i]["momentum_buffer"])
               for i in saved["state"])

    # Loaded into freshly built parts, the next step equals the unsplit model's next step.
    fresh_whole, fresh_parts = _split_model()
    fresh = Optimizers([_sgd(list(p.parameters())) for p in fresh_parts])
    ModelParts(fresh_parts).load_state_dict(state)
    fresh.load_state_dict(saved)
    _step(fresh_whole, list(fresh), 7)
    _step(reference, [single], 7)
    assert all(torch.equal(a, b) for a, b in zip(fresh_whole.state_dict().values(), reference.state_dict().values()))


def test_model_parts_refuse_shared_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="share parameter names"):
        ModelParts([nn.Linear(2, 2), nn.Linear(2, 2)]).state_dict()
    _, parts = _split_model()
    state = ModelParts(parts).state_dict()
    state["c.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*c.weight"):
        ModelParts(parts).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key"):
        ModelParts(parts).load_state_dict(OrderedDict((k, v) for k, v in state.items() if k != "b.bias"))


def test_lr_schedulers_load_into_every_optimizer() -> None:
    _, parts = _split_model()
    optimizers = Optimizers([_sgd(list(p.parameters())) for p in parts])
    cfg = ScheduleConfig(name="cosine", warmup_steps=2)
    schedulers = LRSchedulers([torch.optim.lr_scheduler.LambdaLR(o, lr_multiplier(cfg, 10)) for o in optimizers])
    for _ in range(5):
        for opt in optimizers:
            opt.step()  # no gradients: changes nothing, but the schedulers expect it first
        schedulers.step()
    again = Optimizers([_sgd(list(p.parameters())) for p in parts])
    loaded = LRSchedulers([torch.optim.lr_scheduler.LambdaLR(o, lr_multiplier(cfg, 10)) for o in again])
    loaded.load_state_dict(schedulers.state_dict())
    for opt in [*optimizers, *again]:
        opt.step()
    loaded.step()
    schedulers.step()
    assert [o.param_groups[0]["lr"] for o in again] == [o.param_groups[0]["lr"] for o in optimizers]


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, progress: TrainState) -> None:
        self.steps.append(progress.step)


class _StopAt:
    """Requests a stop after `step`, as a signal would."""

    def __init__(self, stop: StopFlag, step: int) -> None:
        self.stop, self.step = stop, step

    def on_step_end(self, progress: TrainState) -> None:
        if progress.step == self.step:
            self.stop.request("test")


def test_stopped_and_resumed_in_process_equals_uninterrupted(tmp_path: Path) -> None:
    """Trainer.state_dict()/load_state_dict() carry everything: weights, optimizer, schedule,
    progress (mid-epoch) and the RNG streams of dropout. Callbacks see every step once."""
    recipe = load_recipe("digits", QUICK)
    recorder = _Recorder()
    straight = train(recipe, _context(tmp_path / "straight"), StorageConfig(), ONE_RANK, StopFlag(), [recorder])
    assert straight.outcome == "completed" and recorder.steps == list(range(1, 31))
    assert set(straight.to_dict()) == {"outcome", "step", "epoch", "signal", "checkpoints_committed", "val/loss",
                                       "val/acc"}

    stop = StopFlag()
    cut = train(recipe, _context(tmp_path / "cut"), StorageConfig(), ONE_RANK, stop, [_StopAt(stop, 25)])
    assert (cut.outcome, cut.step, cut.epoch, cut.signal) == ("preempted", 25, 1, "test")
    recorder = _Recorder()
    resumed = train(recipe, _context(tmp_path / "cut", resume=True), StorageConfig(), ONE_RANK, StopFlag(), [recorder])
    assert recorder.steps == list(range(26, 31)) and resumed == straight
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_holds_one_file_per_part(tmp_path: Path) -> None:
    trainer = build_trainer(load_recipe("digits", QUICK), _context(tmp_path / "r"), StorageConfig(), ONE_RANK,
                            StopFlag())
    try:
        state = trainer.state_dict()
        assert list(state) == ["model", "optimizer", "scheduler", "trainer", "rng", "meta"]
        assert len(state["rng"]) == 1 and state["trainer"] == TrainState().state_dict()
        assert state["meta"]["run_id"] == "run-id" and state["meta"]["metrics"] == {}
        assert list(state["model"]) == list(trainer.model.parts[0].state_dict())  # what export reads
    finally:
        trainer.metrics.close()
        trainer.checkpointer.close()


def test_first_step_marker_writes_once(tmp_path: Path) -> None:
    marker = FirstStepMarker(tmp_path)
    marker.on_step_end(TrainState(step=8))
    first = (tmp_path / "first_step.json").read_text()
    marker.on_step_end(TrainState(step=9))
    assert (tmp_path / "first_step.json").read_text() == first and json.loads(first)["step"] == 8
