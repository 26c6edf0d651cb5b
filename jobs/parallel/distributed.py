"""The process group and the device of a rank, and the few collectives the trainer calls itself."""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from jobs.env import RankEnv
from jobs.schema import ParallelConfig, TrainerConfig

log = logging.getLogger("jobs.parallel")

_HOST_GROUP: list = [None]  # the gloo group for host-side flags (see init_distributed)
_TIMEOUT: list = [None]  # parallel.collective_timeout_s as set by init_distributed (None: torch's default)


def pick_device(cfg: TrainerConfig, env: RankEnv) -> torch.device:
    """cuda:<local_rank> when asked for or available under `auto`; the choice is logged, not silent."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if env.is_main:
        why = "requested" if cfg.device != "auto" else "auto: " + ("CUDA available" if device.type == "cuda"
                                                                   else "no CUDA device")
        log.info("device %s (%s)", device, why)
    return device


def init_distributed(env: RankEnv, device: torch.device, cfg: ParallelConfig = ParallelConfig()) -> None:
    """NCCL on CUDA, gloo on CPU; a single rank runs without a process group. The timeouts are the recipe's
    (parallel.collective_timeout_s, parallel.nccl_error_handling), whichever backend started the rank."""
    if not env.distributed or dist.is_initialized():
        return
    # read by ProcessGroupNCCL when it is made: torchrun sets 1, srun nothing (torch's own 3), so set it here
    os.environ.update(cfg.rank_environment())
    options = process_group_options(env, device, cfg)
    dist.init_process_group(**options)
    _TIMEOUT[0] = options["timeout"]
    # Host flags get a gloo group of their own (a collective: made here, at the same point on every rank):
    # under NCCL they never wait for the GPU, and a rank sending a flag can never be matched with a peer
    # still inside a gradient all-reduce of the default group.
    _HOST_GROUP[0] = gloo_group()
    if env.is_main:
        log.info("process group: %s, %d ranks, rendezvous %s:%d; collective timeout %g s (parallel."
                 "collective_timeout_s), NCCL error handling %s", options["backend"], env.world_size,
                 env.master_addr, env.master_port, cfg.collective_timeout_s, cfg.nccl_error_handling)


def gloo_group() -> Any:
    """A new gloo group (a collective: every rank makes it at the same point) with the run's collective
    timeout: torch gives a new group its own default (30 min for gloo) instead of the default group's."""
    return dist.new_group(backend="gloo", timeout=_TIMEOUT[0])


def process_group_options(env: RankEnv, device: torch.device, cfg: ParallelConfig) -> dict[str, Any]:
    """init_process_group's arguments for this rank."""
    cuda = device.type == "cuda"
    return {"backend": "nccl" if cuda else "gloo", "init_method": "env://", "rank": env.rank,
            "world_size": env.world_size, "timeout": timedelta(seconds=cfg.collective_timeout_s),
            "device_id": device if cuda else None}


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which `flag` is True, known to every rank (an out-of-memory error: who had it). A CPU
    tensor on the host gloo group: the answer never waits for a GPU's queue."""
    if not dist.is_initialized():
        return [0] if flag else []
    hits = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    hits[dist.get_rank()] = int(flag)
    dist.all_reduce(hits, op=dist.ReduceOp.SUM, group=_HOST_GROUP[0])
    return [rank for rank, hit in enumerate(hits.tolist()) if hit]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (an allocator failure during the micro-batch search)."""
    return bool(ranks_where(flag))


def gather_values(values: Sequence[float]) -> list[list[float]]:
    """Every rank's `values` (the same count on each), by rank, on every rank: one all-gather of a few
    numbers per rank on the host gloo group (a CPU tensor: it never waits for a GPU's queue)."""
    if not dist.is_initialized():
        return [[float(v) for v in values]]
    mine = torch.tensor(list(values), dtype=torch.float64)
    every = [torch.zeros(len(mine), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine, group=_HOST_GROUP[0])
    return [t.tolist() for t in every]


def host_names() -> list[str]:
    """Every rank's host name, by rank, on every rank (a collective)."""
    if not dist.is_initialized():
        return [socket.gethostname()]
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname(), group=_HOST_GROUP[0])
    return [str(n) for n in names]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank (a decision only rank 0 can make, such as a pruner's)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0, group=_HOST_GROUP[0])
    return bool(value.item())


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets at a barrier: destroying a
    gloo group while a peer is still inside a collective aborts the process (std::terminate) about
    one run in six on a busy machine. After an error the peers may be gone, so no barrier."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _HOST_GROUP[0] = _TIMEOUT[0] = None
