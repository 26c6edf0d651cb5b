"""Model and optimizer state of one model part, in a form that does not depend on the layout.

The model state is always the plain module's name -> full tensor dict (what `launcher export`
writes). Optimizer state comes in two forms, both holding full tensors:
- torch's own (`opt.state_dict()`: parameters numbered 0, 1, ... in the optimizer's order), which
  a plain or DDP part saves, as every checkpoint did before FSDP;
- the FQN form of torch.distributed.checkpoint.state_dict (parameters named, `model.0.weight`),
  which an FSDP part saves: DCP gathers the shards under the parameters' names.
A loader accepts either: the numbers are positions in the part's trainable parameters, the same
list in every layout (fully_shard swaps each parameter in place), so converting is exact.

Whole checkpoints (DDP, and any layout reading one): an FSDP part gathers the FULL state on rank 0
(every rank calls these, they are collectives) and every rank loads the full state and keeps its
shard. Sharded checkpoints (FSDP and pipeline runs save them) use the *_shard functions at the end:
each rank's own part of the state, under the model's names, which DCP reshards on load."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
    get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict

from jobs.parallel.apply import unwrap
from jobs.parallel.fsdp import is_fsdp

# cpu_offload with full_state_dict: rank 0 receives the gathered tensors on the CPU, the others an empty dict
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state and keeps its shard
# one entry per parameter ("state.layers.0.w.exp_avg", "param_groups.layers.0.w.lr"): the stages of a
# pipeline hold different parameters, and whole param_groups lists would collide in DCP's index
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def model_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """The part's full state under its plain names (on an FSDP part: a collective, empty off rank 0)."""
    if is_fsdp(part):
        return get_model_state_dict(part, options=_GATHER)
    return unwrap(part).state_dict()


def load_model_state(part: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict: a missing or an unexpected name fails (on an FSDP part: a collective)."""
    if is_fsdp(part):
        set_model_state_dict(part, state, options=_SCATTER)
    else:
        unwrap(part).load_state_dict(state)


def optimizer_state(part: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """torch's numbered form for a plain or DDP part, the FQN form for an FSDP part (a collective)."""
    return get_optimizer_state_dict(part, opt, options=_GATHER) if is_fsdp(part) else opt.state_dict()


def load_optimizer_state(part: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load either form (see the module docstring) into the part's optimizer."""
    if is_fsdp(part):
        set_optimizer_state_dict(part, opt, named_optimizer_state(part, opt, state), options=_SCATTER)
    else:
        opt.load_state_dict(numbered_optimizer_state(part, opt, state))


def is_named(state: dict[str, Any]) -> bool:
    """Whether an optimizer state is in the FQN form (its groups list names, not numbers)."""
    return any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])


def parameter_names(part: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order torch numbers them."""
    names = {id(p): n for n, p in unwrap(part).named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def named_optimizer_state(part: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    if is_named(state):
        return state
    names = parameter_names(part, opt)
    _check_count(state, len(names))
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def numbered_optimizer_state(part: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    if not is_named(state):
        return state
    number = {n: i for i, n in enumerate(parameter_names(part, opt))}
    listed = [n for g in state["param_groups"] for n in g["params"]]
    unknown = [n for n in listed if n not in number]
    if unknown or len(listed) != len(number):
        raise ValueError(f"the checkpoint's optimizer state names {len(listed)} parameters, this model part "
                         f"trains {len(number)}" + (f"; unknown: {', '.join(unknown[:5])}" if unknown else ""))
    return {"state": {number[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]]}


def _check_count(state: dict[str, Any], count: int) -> None:
    listed = sum(len(g["params"]) for g in state["param_groups"])
    if listed != count:
        raise ValueError(f"the checkpoint's optimizer state has {listed} parameters, this model part trains {count}")


# --- pipeline stages: each rank holds a disjoint part of the model, under the model's own names -----------

def gather_stages(state: dict[str, Any]) -> dict[str, Any]:
    """The stages' model states merged on rank 0, in stage order (the model's order); {} on the others.
    A collective: every stage calls it."""
    gathered = _gather_to_main({k: v.detach().cpu() for k, v in state.items()}, getattr(state, "_metadata", {}))
    if gathered is None:
        return {}
    merged: OrderedDict[str, Any] = OrderedDict()
    versions: OrderedDict[str, Any] = OrderedDict()
    for tensors, meta in gathered:
        merged.update(tensors)
        versions.update(meta)
    merged._metadata = versions  # type: ignore[attr-defined]
    return merged


def stage_optimizer_state(part: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """This stage's share of a whole model's optimizer state, in torch's numbered form for `opt`. A numbered
    state (a DDP run's) is named first by the stages' parameter names in stage order, which is the whole
    model's order: a collective then."""
    if not is_named(state):
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, parameter_names(part, opt))
        names = list(dict.fromkeys(n for stage in everyone for n in stage))  # replicas list theirs twice
        _check_count(state, len(names))
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    own = set(parameter_names(part, opt))
    mine = {"state": {n: s for n, s in state["state"].items() if n in own},
            "param_groups": [{**g, "params": [n for n in g["params"] if n in own]} for g in state["param_groups"]]}
    return numbered_optimizer_state(part, opt, mine)


def _gather_to_main(*mine: Any) -> Optional[list[Any]]:
    """Every rank's `mine` on rank 0, in rank order (None elsewhere)."""
    everyone: Optional[list[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine if len(mine) > 1 else mine[0], everyone, dst=0)
    return everyone


# --- sharded checkpoints: what this rank holds, as DCP saves and reshards it ----------------------------

def model_shard(part: nn.Module) -> dict[str, Any]:
    """The part's own state under the model's names: DTensors on an FSDP part (this rank's shard), the
    stage's tensors on a pipeline stage, plain tensors otherwise. Not a collective."""
    return get_model_state_dict(part)


def load_model_shard(part: nn.Module, state: dict[str, Any]) -> None:
    set_model_state_dict(part, state)


def optimizer_shard(part: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of the part's parameters, one flat entry per parameter and field. On an
    optimizer that has not stepped yet DCP creates the state first (a step with zero learning rate)."""
    return get_optimizer_state_dict(part, opt, options=_FLAT)


def load_optimizer_shard(part: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(part, opt, state, options=_FLAT)
