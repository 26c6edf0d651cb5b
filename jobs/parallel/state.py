"""Model and optimizer state of one model part, in a form that does not depend on the layout.

The model state is always the plain module's name -> full tensor dict (what `launcher export`
writes). Optimizer state comes in two forms, both holding full tensors:
- torch's own (`opt.state_dict()`: parameters numbered 0, 1, ... in the optimizer's order), which
  a plain or DDP part saves, as every checkpoint did before FSDP;
- the FQN form of torch.distributed.checkpoint.state_dict (parameters named, `model.0.weight`),
  which an FSDP part saves: DCP gathers the shards under the parameters' names.
A loader accepts either: the numbers are positions in the part's trainable parameters, the same
list in every layout (fully_shard swaps each parameter in place), so converting is exact.

Stopgap for sharded checkpoints: an FSDP part gathers the FULL state on rank 0 (every rank calls
these, they are collectives) and every rank loads the full state and keeps its shard."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
    get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict

from jobs.parallel.apply import unwrap
from jobs.parallel.fsdp import is_fsdp

# cpu_offload with full_state_dict: rank 0 receives the gathered tensors on the CPU, the others an empty dict
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state and keeps its shard


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
