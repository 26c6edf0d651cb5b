"""How a replica's batch is split: micro batch x accumulation, fixed by the recipe or, with
`trainer.micro_batch: auto`, the largest micro batch that fits in memory on every rank.

The samples of an optimizer step never depend on the split (jobs.training.step.micro_batches takes
`micro x accum` indices per step), so the split can change at any step boundary, or within a step that
is redone from its first micro-batch, without skipping or repeating a sample. The split in use is
recorded in the run (`batch.json`): a resumed or requeued run reuses it instead of searching again.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from jobs.schema import RecipeConfig
from jobs.schema.run_files import load_record

log = logging.getLogger("jobs.trainer")

RECORD = "batch.json"  # in the run directory, written by rank 0
MARGIN = 0.1  # a micro batch is taken when 10% more samples fit: headroom for fragmentation and longer inputs


@dataclass(frozen=True)
class BatchPlan:
    micro: int  # samples per forward/backward on one rank
    accum: int  # micro-batches per optimizer step
    replicas: int  # data-parallel ranks

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.replicas

    def line(self) -> str:
        return f"micro batch {self.micro} x accumulation {self.accum} x {self.replicas} ranks = {self.global_batch}"

    def lowered(self) -> Optional["BatchPlan"]:
        """Half the micro batch (the largest divisor of the replica's batch at most half of it), the
        accumulation raised to keep the global batch; None below one sample."""
        per_replica = self.micro * self.accum
        smaller = [d for d in divisors(per_replica) if d <= self.micro // 2]
        if not smaller:
            return None
        return BatchPlan(smaller[-1], per_replica // smaller[-1], self.replicas)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fixed_plan(recipe: RecipeConfig, replicas: int) -> BatchPlan:
    micro = recipe.trainer.micro_batch
    assert micro != "auto"
    return BatchPlan(micro, recipe.replica_batch // micro, replicas)


def search(per_replica: int, fits: Callable[[int], bool]) -> tuple[Optional[int], list[tuple[int, bool]]]:
    """The largest divisor of `per_replica` for which `fits` holds, and every (candidate, fits) tried.
    Grows from 1 by doubling (cheap small tries bound the size quickly), then bisects between the last
    that fit and the first that did not. `fits` must answer the same on every rank (it is agreed)."""
    sizes, tried = divisors(per_replica), []

    def attempt(index: int) -> bool:
        ok = fits(sizes[index])
        tried.append((sizes[index], ok))
        return ok

    if not attempt(0):
        return None, tried
    good, bad = 0, len(sizes)
    while good < len(sizes) - 1:  # grow: the next divisor at least twice the last that fit
        nxt = next(i for i, d in enumerate(sizes) if d >= 2 * sizes[good] or i == len(sizes) - 1)
        if not attempt(nxt):
            bad = nxt
            break
        good = nxt
    while bad - good > 1:  # bisect over the divisors in between
        mid = (good + bad) // 2
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return sizes[good], tried


# ---------------------------------------------------------------------- the run's record
def read_record(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        data = load_record(run_dir / RECORD)  # bounded: a damaged record reads as none, a search runs again
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / RECORD)  # never half a record: a resume reads it


def recorded_plan(record: Optional[dict[str, Any]], per_replica: int, replicas: int) -> Optional[BatchPlan]:
    """The plan a record holds, if it was made for this batch and layout (a relaunch on other ranks searches again)."""
    if not record or record.get("replicas") != replicas or record.get("per_replica") != per_replica:
        return None
    micro = record.get("micro_batch")
    if not isinstance(micro, int) or micro < 1 or per_replica % micro:
        return None
    return BatchPlan(micro, per_replica // micro, replicas)


def shared_record(run_dir: Path, is_main: bool) -> Optional[dict[str, Any]]:
    """Rank 0's reading of the record, on every rank (nodes that do not share the run directory too)."""
    found = [read_record(run_dir) if is_main else None]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return found[0]


def new_record(plan: BatchPlan, tried: list[tuple[int, bool]]) -> dict[str, Any]:
    return {"micro_batch": plan.micro, "grad_accum": plan.accum, "replicas": plan.replicas,
            "per_replica": plan.micro * plan.accum, "global_batch": plan.global_batch,
            "searched": [{"micro_batch": m, "fits": ok} for m, ok in tried], "lowered": []}


def lowered_record(record: dict[str, Any], plan: BatchPlan, step: int, ranks: list[int], before: int) -> dict[str, Any]:
    return {**record, "micro_batch": plan.micro, "grad_accum": plan.accum,
            "lowered": [*record.get("lowered", []), {"step": step, "from": before, "to": plan.micro, "ranks": ranks}]}


def probe_size(micro: int) -> int:
    """Samples a probe of `micro` runs: the micro batch and its margin."""
    return math.ceil(micro * (1 + MARGIN))


def optimizer_state_bytes(optimizers: Any) -> int:
    """What the optimizers will allocate at their first step and do not hold yet (AdamW: two moments per
    parameter; SGD with momentum: one): a probe holds as much so that a fit before step 1 still fits after."""
    total = 0
    for opt in optimizers:
        for group in opt.param_groups:
            slots = 2 if "betas" in group else (1 if group.get("momentum") else 0)
            for p in group["params"]:
                if not opt.state.get(p):
                    total += slots * p.numel() * p.element_size()
    return total


def reserve(nbytes: int, device: torch.device) -> Optional[torch.Tensor]:
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
