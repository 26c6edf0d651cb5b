"""What a checkpoint must restore besides weights and optimizer state for a resumed run to equal
an uninterrupted one: the progress counters and every rank's random number streams."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from jobs.env import RankEnv

log = logging.getLogger("jobs.trainer")  # the name log lines have always shown


@dataclass
class TrainState:
    """Progress of the run."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch (mid-epoch resume)
    best: Optional[float] = None  # best value of checkpoint.best_metric so far

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def seed_rank(seed: int, rank: int) -> None:
    """Distinct dropout streams per rank (the initial weights were drawn before, the same everywhere)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + 1000 * (rank + 1))


class RankRNG:
    """The Python, NumPy, torch and CUDA generators of every rank. Each rank draws its own dropout
    stream, so the checkpoint holds one state per rank: state_dict() gathers them (a collective:
    every rank calls it) and load_state_dict() restores this rank's own. A checkpoint written by a
    different number of ranks cannot be matched rank to rank: the streams then restart as seeded
    (the data order still resumes exactly; it depends on the step, not on these generators)."""

    def __init__(self, env: RankEnv, device: torch.device) -> None:
        self.env, self.device = env, device

    def state_dict(self) -> list[dict[str, Any]]:
        mine = _capture(self.device)
        if not dist.is_initialized():
            return [mine]
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.env.world_size:
            _restore(states[self.env.rank], self.device)
        elif self.env.is_main:
            log.warning("checkpoint was written by %d ranks, now %d: RNG streams restart (data order is kept)",
                        len(states), self.env.world_size)


def _capture(device: torch.device) -> dict[str, Any]:
    # NumPy's state as tensors and numbers: checkpoints load with weights_only=True.
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


def _restore(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    """random.setstate() wants the nested tuples that a save may have turned into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
