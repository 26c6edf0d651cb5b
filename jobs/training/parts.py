"""The stateful parts a rank trains, as containers of one entry per model part (torchtitan's
ModelWrapper, OptimizersContainer and LRSchedulersContainer are the model). Today a rank holds one
part; pipeline stages will put several on one rank, and only how the parts are built changes: the
loop and the checkpoint see these containers. Each container's state_dict() is what one
checkpoint file holds, in the same format as with one plain module and one optimizer (with FSDP:
the full model, and the optimizer state by parameter name; see jobs.parallel.state)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Optional

import torch
from torch import nn

from jobs import parallel
from jobs.parallel.state import gather_stages, is_named, load_model_shard, \
    load_optimizer_shard, model_shard, optimizer_shard, stage_optimizer_state


class ModelParts:
    """The model pieces on this rank, each wrapped or sharded for its parallelism. The state is
    the unwrapped modules' tensors merged into one flat name -> tensor dict (the parts of one model
    have disjoint names): the "model" file that export and pretrained loading read is the same
    whatever the layout. With `pipelined`, each rank holds one pipeline stage, a disjoint part of the
    model: the state is gathered from every stage to rank 0, and each stage loads its own names."""

    def __init__(self, parts: list[nn.Module], pipelined: bool = False) -> None:
        if not parts:
            raise ValueError("ModelParts needs at least one module")
        self.parts, self.pipelined = parts, pipelined

    @property
    def single(self) -> nn.Module:
        """The one wrapped module to call: several parts need a pipeline schedule to run them."""
        if len(self.parts) != 1:
            raise NotImplementedError(f"{len(self.parts)} model parts on one rank need a pipeline schedule")
        return self.parts[0]

    def unwrapped(self) -> list[nn.Module]:
        return [parallel.unwrap(p) for p in self.parts]

    def trainable(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters() if p.requires_grad]

    def train(self) -> None:
        for part in self.parts:
            part.train()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A collective with FSDP (the shards are gathered to rank 0): every rank calls it."""
        merged: OrderedDict[str, torch.Tensor] = OrderedDict()
        versions: OrderedDict[str, Any] = OrderedDict()  # module versions, read by load_state_dict
        for part in self.parts:
            state = parallel.model_state(part)
            shared = merged.keys() & state.keys()
            if shared:
                raise ValueError(f"model parts share parameter names {sorted(shared)[:3]}: each name must "
                                 "belong to one part")
            merged.update(state)
            versions.update(getattr(state, "_metadata", {}))
        merged._metadata = versions  # type: ignore[attr-defined]
        return gather_stages(merged) if self.pipelined else merged

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each part takes its own names, strictly (a missing one fails); a name no part has fails too.
        Every rank passes the full state (an FSDP part keeps its shard of it)."""
        claimed: set[str] = set()
        versions = getattr(state, "_metadata", None)
        for part in self.parts:
            own = parallel.unwrap(part).state_dict().keys()  # plain names in every layout
            mine: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in state.items() if k in own)
            if versions is not None:
                mine._metadata = versions  # type: ignore[attr-defined]
            parallel.load_model_state(part, mine)
            claimed |= own
        unexpected = [k for k in state if k not in claimed]
        if unexpected and not self.pipelined:  # a stage leaves the other stages' names
            raise RuntimeError(f"Error(s) in loading state_dict: Unexpected key(s) in state_dict: "
                               f"{', '.join(repr(k) for k in unexpected[:10])}")


    def shard_state(self) -> dict[str, Any]:
        """This rank's part of the model state for a sharded checkpoint (not a collective)."""
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(model_shard(part))
        return merged

    def load_shard_state(self, state: dict[str, Any]) -> None:
        """The inverse of shard_state(), given a template it returned, filled by DCP."""
        for part in self.parts:
            own = parallel.unwrap(part).state_dict().keys()
            load_model_shard(part, {k: v for k, v in state.items() if k in own})


class Optimizers:
    """One optimizer per model part. The state is one optimizer state dict: the parts' parameter
    groups in turn. Plain and DDP parts save torch's own form, parameter numbers running on from one
    part to the next (with one part: that optimizer's own state dict); FSDP parts save the FQN form
    (parameters by name: see jobs.parallel.state). load_state_dict() takes either, whatever the
    layout now, and splits it back by each optimizer's groups. Pipeline stages (`pipelined`) save only
    sharded checkpoints (shard_state()); each loads its own parameters' entries of a whole one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], parts: Optional[list[nn.Module]] = None,
                 pipelined: bool = False) -> None:
        self.optimizers, self.pipelined = optimizers, pipelined
        # the part each optimizer steps: names its parameters (an FSDP state, a change of layout)
        self.parts = parts
        if parts is not None and len(parts) != len(optimizers):
            raise ValueError(f"{len(optimizers)} optimizers for {len(parts)} model parts: one each")

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def lr(self) -> float:
        """The learning rate now (every group follows the same schedule)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """A collective with FSDP parts (their state is gathered to rank 0): every rank
        calls it."""
        if self.pipelined:  # stages hold different parameters: only a sharded checkpoint has room for them
            raise NotImplementedError("pipeline stages save their optimizer state with shard_state()")
        state: dict[Any, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for part, opt in self._pairs():
            own = parallel.optimizer_state(part, opt) if part is not None else opt.state_dict()
            if not own.get("param_groups"):  # an FSDP part off rank 0: its state was gathered to rank 0
                continue
            if is_named(own):
                state.update(own["state"])
                groups += own["param_groups"]
                continue
            state.update({offset + i: s for i, s in own["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.pipelined:
            part, opt = self._stage()
            opt.load_state_dict(stage_optimizer_state(part, opt, state))
            return
        groups = state["param_groups"]
        if len(groups) != sum(len(opt.param_groups) for opt in self.optimizers):
            raise ValueError(f"the checkpoint's optimizer state has {len(groups)} parameter groups, the "
                             f"optimizers here {sum(len(o.param_groups) for o in self.optimizers)}")
        start = 0
        for part, opt in self._pairs():
            mine = groups[start:start + len(opt.param_groups)]
            start += len(mine)
            own = _own_state(state["state"], mine)
            if part is not None:
                parallel.load_optimizer_state(part, opt, own)
            else:
                opt.load_state_dict(own)

    def shard_state(self) -> dict[str, Any]:
        """This rank's optimizer state for a sharded checkpoint: one flat entry per parameter and
        field, under the parameters' names (jobs.parallel.state.optimizer_shard)."""
        merged: dict[str, Any] = {}
        for part, opt in self._pairs():
            if part is None:
                raise NotImplementedError("a sharded optimizer state needs the model parts its optimizers step")
            merged.update(optimizer_shard(part, opt))
        return merged

    def load_shard_state(self, state: dict[str, Any]) -> None:
        for part, opt in self._pairs():
            assert part is not None  # shard_state() built the template
            load_optimizer_shard(part, opt, state)

    def _stage(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.parts is None or len(self.parts) != 1:
            raise NotImplementedError("a pipeline rank holds one stage and its optimizer")
        return self.parts[0], self.optimizers[0]

    def _pairs(self) -> list[tuple[Optional[nn.Module], torch.optim.Optimizer]]:
        return list(zip(self.parts or [None] * len(self.optimizers), self.optimizers))


def _own_state(state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer's share of a merged state: its groups and the entries of their parameters,
    numbers counted from 0 again (named parameters keep their names)."""
    listed = [p for g in groups for p in g["params"]]
    local = {p: (p if isinstance(p, str) else i) for i, p in enumerate(listed)}
    return {"state": {local[p]: s for p, s in state.items() if p in local},
            "param_groups": [{**g, "params": [local[p] for p in g["params"]]} for g in groups]}


class LRSchedulers:
    """One LR scheduler per optimizer, stepped together. They are built from the same schedule and
    step in lockstep, so the checkpoint holds the first one's state and each loads it (torchtitan's
    LRSchedulersContainer does the same)."""

    def __init__(self, schedulers: list[torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state)

