"""The stateful parts a rank trains, as containers of one entry per model part (torchtitan's
ModelWrapper, OptimizersContainer and LRSchedulersContainer are the model). Today a rank holds one
part; pipeline stages will put several on one rank, and only how the parts are built changes: the
loop and the checkpoint see these containers. Each container's state_dict() is what one
checkpoint file holds, in the same format as with one plain module and one optimizer."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import nn

from jobs import parallel


class ModelParts:
    """The model pieces on this rank, each wrapped for its parallelism (DDP today). The state is
    the unwrapped modules' tensors merged into one flat name -> tensor dict (the parts of one model
    have disjoint names): the "model" file that export and pretrained loading read is the same
    whatever the layout."""

    def __init__(self, parts: list[nn.Module]) -> None:
        if not parts:
            raise ValueError("ModelParts needs at least one module")
        self.parts = parts

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
        merged: OrderedDict[str, torch.Tensor] = OrderedDict()
        versions: OrderedDict[str, Any] = OrderedDict()  # module versions, read by load_state_dict
        for module in self.unwrapped():
            state = module.state_dict()
            shared = merged.keys() & state.keys()
            if shared:
                raise ValueError(f"model parts share parameter names {sorted(shared)[:3]}: each name must "
                                 "belong to one part")
            merged.update(state)
            versions.update(getattr(state, "_metadata", {}))
        merged._metadata = versions  # type: ignore[attr-defined]
        return merged

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each part takes its own names, strictly (a missing one fails); a name no part has fails too."""
        claimed: set[str] = set()
        versions = getattr(state, "_metadata", None)
        for module in self.unwrapped():
            own = module.state_dict().keys()
            mine: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in state.items() if k in own)
            if versions is not None:
                mine._metadata = versions  # type: ignore[attr-defined]
            module.load_state_dict(mine)
            claimed |= own
        unexpected = [k for k in state if k not in claimed]
        if unexpected:
            raise RuntimeError(f"Error(s) in loading state_dict: Unexpected key(s) in state_dict: "
                               f"{', '.join(repr(k) for k in unexpected[:10])}")


class Optimizers:
    """One optimizer per model part. The state is one torch optimizer state dict: the parts' parameter
    groups in turn, parameter ids running on from one part to the next (with one part: that
    optimizer's own state dict); load_state_dict() splits it back by each optimizer's groups."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

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
        state: dict[Any, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            own = opt.state_dict()
            state.update({offset + i: s for i, s in own["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state["param_groups"]
        if len(groups) != sum(len(opt.param_groups) for opt in self.optimizers):
            raise ValueError(f"the checkpoint's optimizer state has {len(groups)} parameter groups, the "
                             f"optimizers here {sum(len(o.param_groups) for o in self.optimizers)}")
        start = 0
        for opt in self.optimizers:
            mine = groups[start:start + len(opt.param_groups)]
            start += len(mine)
            ids = {i for g in mine for i in g["params"]}
            opt.load_state_dict({"state": {i: s for i, s in state["state"].items() if i in ids}, "param_groups": mine})


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

