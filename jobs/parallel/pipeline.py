"""Pipeline parallelism with manual stages (torchtitan's way): `parallel.strategy: pipeline` (jobs.parallel.apply).

Each rank deep-copies the whole model and deletes what its stage does not own; the repeated blocks live in
one `nn.ModuleDict` (`layers.0`, `layers.1`, ...), so the blocks a stage keeps keep their names and a stage's
state dict is a disjoint part of the single-process one. `torch.distributed.pipelining`'s `PipelineStage`
and a single-stage schedule (GPipe or 1F1B) then move microbatches between the ranks. With more ranks than
stages, the ranks form a 2-D mesh (`PipelineLayout`): each stage has several replicas, each replica's pipeline
trains on its own share of the batch, and a stage's replicas average their gradients (DDP's math).

Why not the tracer front end (`pipeline(module, mb_args, split_spec=...)`): on torch 2.13 it fails on these
models (`torch.export` cannot capture a ModuleDict model as one graph); manual stages work on CPU/gloo.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from jobs.schema.parallel import MULTI_STAGE_SCHEDULES

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# One stage per rank: the schedules whose gloo hangs were fixed (pytorch PR #152938, in 2.13). The names are
# the recipe's (jobs.schema.parallel checks them when a recipe is loaded).
SINGLE_STAGE_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


# --- which stage owns what ---------------------------------------------------------------------------------

def _blocks_container(model: nn.Module) -> str:
    """The name of the model's one top-level `nn.ModuleDict` of repeated blocks (`layers` in jobs.gpt)."""
    found = [name for name, child in model.named_children() if isinstance(child, nn.ModuleDict)]
    if len(found) != 1:
        raise ValueError(f"pipeline parallelism needs the model's repeated blocks in exactly one top-level "
                         f"nn.ModuleDict (as jobs.gpt keeps them in `layers`); {type(model).__name__} has "
                         f"{len(found)}: {found}")
    return found[0]


def model_units(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The units a stage can own, in forward order: the top-level parts before the blocks (they go to the
    first stage), the blocks (`layers.<key>`), the top-level parts after them (they go to the last stage).
    Parts already None (deleted) are left out."""
    container = _blocks_container(model)
    before: list[str] = []
    blocks: list[str] = []
    after: list[str] = []
    seen_blocks = False
    for name, child in model.named_children():  # None children (deleted parts) are not listed
        if name == container:
            blocks, seen_blocks = [f"{name}.{key}" for key in child.keys()], True
        else:  # registration order is forward order in jobs.gpt (and torchtitan's models)
            (after if seen_blocks else before).append(name)
    return before, blocks, after


def _numel(model: nn.Module, unit: str) -> int:
    return sum(p.numel() for p in model.get_submodule(unit).parameters())


def split_points(model: nn.Module, points: Optional[list[str]], stages: int) -> list[list[str]]:
    """The units each of `stages` stages owns. `points` names the block each stage after the first starts
    at (["layers.2"]: stage 1 starts at layers.2); None balances the stages by parameter count, counting
    the parts before the blocks into the first stage and those after into the last. Every stage owns at
    least one block, so the blocks run in order once each."""
    before, blocks, after = model_units(model)
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, not {stages}")
    if stages > len(blocks):
        raise ValueError(f"{stages} pipeline stages but the model has {len(blocks)} blocks: every stage "
                         f"must own at least one block; use at most {len(blocks)} stages")
    starts = _named_starts(blocks, points, stages) if points is not None else _balanced_starts(
        model, before, blocks, after, stages)
    bounds = starts + [len(blocks)]
    owned = [blocks[bounds[i]:bounds[i + 1]] for i in range(stages)]
    owned[0] = before + owned[0]
    owned[-1] = owned[-1] + after
    return owned


def _named_starts(blocks: list[str], points: list[str], stages: int) -> list[int]:
    if len(points) != stages - 1:
        raise ValueError(f"{stages} pipeline stages need {stages - 1} split points, got {len(points)}: "
                         f"{points}")
    valid = blocks[1:]
    for point in points:
        if point not in valid:
            raise ValueError(f"pipeline split point {point!r} is not a block a stage can start at; valid "
                             f"points: {', '.join(valid) or '(none: the model has one block)'}")
    starts = [blocks.index(p) for p in points]
    if starts != sorted(set(starts)):
        raise ValueError(f"pipeline split points must be distinct and in the model's order, got {points}")
    return [0] + starts


def _balanced_starts(model: nn.Module, before: list[str], blocks: list[str], after: list[str],
                     stages: int) -> list[int]:
    """Contiguous block ranges that minimise the largest stage's parameter count (a small dynamic
    programme: models have tens of blocks). Ties go to the earliest split, so the result is deterministic."""
    sizes = [_numel(model, b) for b in blocks]
    head = sum(_numel(model, u) for u in before)
    tail = sum(_numel(model, u) for u in after)
    n = len(blocks)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    def cost(i: int, j: int) -> int:  # blocks i..j-1 as one stage, with the head/tail parts it carries
        return prefix[j] - prefix[i] + (head if i == 0 else 0) + (tail if j == n else 0)

    # best[s][j]: (largest stage, starts) for blocks 0..j-1 split into s stages
    best: list[dict[int, tuple[int, list[int]]]] = [{} for _ in range(stages + 1)]
    best[1] = {j: (cost(0, j), [0]) for j in range(1, n + 1)}
    for s in range(2, stages + 1):
        for j in range(s, n + 1):
            options = [(max(best[s - 1][i][0], cost(i, j)), best[s - 1][i][1] + [i]) for i in range(s - 1, j)]
            best[s][j] = min(options, key=lambda o: o[0])
    return best[stages][n][1]


# --- one stage's module --------------------------------------------------------------------------------------

def _check_ties(model: nn.Module, owned: set[str]) -> None:
    """Refuse a parameter shared between a unit this stage owns and one it does not (tied embeddings with
    the embedding and the output on different stages): its gradient would have to be summed across
    stages, which nothing here does."""
    before, blocks, after = model_units(model)
    holders: dict[int, list[str]] = {}
    for unit in before + blocks + after:
        for pname, param in model.get_submodule(unit).named_parameters(remove_duplicate=False):
            holders.setdefault(id(param), []).append(f"{unit}.{pname}")
    for names in holders.values():
        units = [n for n in names if any(n.startswith(u + ".") for u in owned)]
        if units and len(units) < len(names):
            others = [n for n in names if n not in units]
            raise ValueError(f"parameter {units[0]} is tied to {others[0]}, but the pipeline split puts them on "
                             f"different stages; tied weights across stages are not supported (their gradient "
                             f"would have to be summed across stages): build the model untied "
                             f"(model.kwargs.tied_embeddings: false)")


def build_stage(model: nn.Module, stage_index: int, num_stages: int, owned: list[str],
                device: torch.device) -> nn.Module:
    """A copy of `model` holding only `owned` (one entry of `split_points`), on `device`. Parts it does not
    own become None and blocks it does not own leave the ModuleDict, so every name it keeps is the full
    model's name: a checkpoint is the union of the stages' state dicts, whatever the split."""
    before, blocks, after = model_units(model)
    unknown = [u for u in owned if u not in before + blocks + after]
    if unknown:
        raise ValueError(f"stage {stage_index} owns {unknown}, which the model does not have")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage index {stage_index} is outside 0..{num_stages - 1}")
    keep = set(owned)
    _check_ties(model, keep)
    stage = copy.deepcopy(model)
    container = _blocks_container(model)
    blocks_dict = stage.get_submodule(container)
    for unit in blocks:
        if unit not in keep:
            del blocks_dict[unit.split(".", 1)[1]]
    for unit in before + after:
        if unit not in keep:
            setattr(stage, unit, None)
    return stage.to(device)


def clip_grad_norm_(stage_module: nn.Module, max_norm: float, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`nn.utils.clip_grad_norm_` over the whole pipelined model: each stage holds part of the gradient,
    so the squared norms are summed across the stages (`group`: one replica's pipeline, never the whole
    world, which holds every stage once per replica) before every stage scales by the same factor. Call
    it after the replicas' average, as DDP clips the averaged gradient."""
    grads = [p.grad for p in stage_module.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squared = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        squared += g.detach().float().pow(2).sum()
    dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=group)
    total = squared.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


# --- where a rank sits: stage x replica ---------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineLayout:
    """A rank's place in the 2-D mesh of a pipeline (x data parallel) run, and the groups it talks on.

    The mesh dims are ("pp", "dp"), pp outermost, as TorchTitan orders its mesh (pp first, the data-parallel
    dims inside it): rank = stage * replicas + replica. A stage's replicas are neighbouring ranks, so on one
    node whenever procs_per_node is a multiple of the replicas: the gradient all-reduce, which moves every
    parameter each step, stays on the fast links and only activations cross between nodes. Rank 0 is
    stage 0 of replica 0. What a sharded checkpoint needs: a stage's replicas hold identical copies
    (`replica_ranks`), the stages of one replica (`stage_ranks`) hold the whole model between them."""

    stages: int
    replicas: int
    stage: int  # this rank's stage: the blocks it owns
    replica: int  # which share of the data this rank's pipeline trains on
    mesh: Optional[DeviceMesh] = None  # set by with_groups()
    pp_group: Optional[dist.ProcessGroup] = None  # this replica's stages: activations, the loss, the clip norm
    dp_group: Optional[dist.ProcessGroup] = None  # this stage's replicas: the gradient average

    @classmethod
    def of(cls, stages: int, rank: int, world_size: int) -> "PipelineLayout":
        """Coordinates only (no groups, nothing collective): what the data sampler and the split need."""
        if stages < 1 or world_size % stages:
            raise ValueError(f"{stages} pipeline stages do not divide {world_size} ranks")
        replicas = world_size // stages
        return cls(stages, replicas, stage=rank // replicas, replica=rank % replicas)

    def rank_of(self, stage: int, replica: int) -> int:
        """The global rank holding `replica` of `stage`."""
        return stage * self.replicas + replica

    def replica_ranks(self) -> list[int]:
        """The global ranks holding this rank's stage (identical copies of its weights and optimizer)."""
        return [self.rank_of(self.stage, r) for r in range(self.replicas)]

    def stage_ranks(self) -> list[int]:
        """The global ranks of this rank's pipeline, in stage order: the whole model between them."""
        return [self.rank_of(s, self.replica) for s in range(self.stages)]

    def with_groups(self, device_type: str) -> "PipelineLayout":
        """The same layout with the mesh and its two groups. A collective: every rank calls it, in step."""
        mesh = init_device_mesh(device_type, (self.stages, self.replicas), mesh_dim_names=("pp", "dp"))
        if tuple(mesh.get_coordinate() or ()) != (self.stage, self.replica):  # the mesh must agree with `of`
            raise RuntimeError(f"device mesh puts this rank at {mesh.get_coordinate()}, the layout at "
                               f"{(self.stage, self.replica)}")
        return replace(self, mesh=mesh, pp_group=mesh.get_group("pp"), dp_group=mesh.get_group("dp"))


def average_gradients(module: nn.Module, layout: PipelineLayout) -> None:
    """DDP's gradient: the mean over this stage's replicas, each having run its own share of the batch.
    One all-reduce of all gradients after the schedule's last backward, rather than wrapping the stage in
    DDP, whose per-backward hooks the schedule would have to silence for every microbatch but the last."""
    if layout.replicas == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=layout.dp_group)
    flat /= layout.replicas
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --- running it ---------------------------------------------------------------------------------------------

def check_schedule(name: str, device_type: str) -> type:
    """The schedule class for `name`; the multi-stage schedules are refused (and named why)."""
    if name in SINGLE_STAGE_SCHEDULES:
        return SINGLE_STAGE_SCHEDULES[name]
    if name in MULTI_STAGE_SCHEDULES:
        why = ("gloo hangs were fixed only for the single-stage schedules (pytorch PR #152938)"
               if device_type == "cpu" else "several stages per rank are not built yet")
        raise ValueError(f"pipeline schedule {name!r} is not supported on {device_type}: {why}; use one of "
                         f"{', '.join(SINGLE_STAGE_SCHEDULES)}")
    raise ValueError(f"unknown pipeline schedule {name!r}; valid: "
                     f"{', '.join([*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES])}")


class PipelineRunner:
    """One rank's stage and schedule. Every rank of a replica's pipeline calls `train_step`/`eval_step` with
    the same whole batch (each uses the part it needs: the first stage x, the last stage y) and gets back
    the batch's loss, the mean over microbatches. Replicas run their own batches side by side."""

    def __init__(self, stage_module: nn.Module, layout: PipelineLayout, schedule: str, n_microbatches: int,
                 loss_fn: LossFn) -> None:
        device = next(stage_module.parameters()).device
        schedule_cls = check_schedule(schedule, device.type)
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, not {n_microbatches}")
        if layout.mesh is None:
            raise ValueError("the pipeline layout has no groups yet: build it with PipelineLayout.with_groups()")
        self.module, self.layout, self.device = stage_module, layout, device
        self.group, self.n_microbatches, self.num_stages = layout.pp_group, n_microbatches, layout.stages
        self.stage_index = layout.stage
        self.stage = PipelineStage(stage_module, self.stage_index, self.num_stages, device, group=self.group)
        # scale_grads: the gradient of the mean of per-microbatch mean losses, as one process's loss.mean()
        self.schedule = schedule_cls(self.stage, n_microbatches, loss_fn=loss_fn, scale_grads=True)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _check_batch(self, x: torch.Tensor) -> None:
        # Unequal microbatches would weigh samples unequally in the mean of microbatch means.
        if x.shape[0] % self.n_microbatches:
            raise ValueError(f"a batch of {x.shape[0]} samples does not split into {self.n_microbatches} "
                             f"equal microbatches; make the micro batch size a multiple of n_microbatches")

    def _run(self, run: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        self._check_batch(x)
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:
            out = run(x.to(self.device), target=y.to(self.device), losses=losses)
        elif self.is_first:
            out = run(x.to(self.device))
        elif self.is_last:
            out = run(target=y.to(self.device), losses=losses)
        else:
            out = run()
        loss = torch.stack(losses).mean().detach() if self.is_last else torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.group, group_src=self.num_stages - 1)  # so every stage can log it
        return loss, out

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every microbatch; the gradients, averaged over the stage's replicas,
        are left in the stage's parameters for the optimizer (zero them before, as with one process).
        Returns this replica's batch loss."""
        loss = self._run(self.schedule.step, x, y)[0]
        average_gradients(self.module, self.layout)
        return loss

    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward only, in eval mode: the batch's loss on every stage, and the last stage's output
        (logits, for metrics) there (None elsewhere)."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return self._run(self.schedule.eval, x, y)
        finally:
            self.module.train(was_training)
