"""FSDP vs DDP on one >= 100M-parameter GPT, 2 ranks: per-rank training memory and step time; and FSDP vs
tensor parallel x FSDP on 4 ranks (bench/tp_memory.py runs those).

    torchrun --standalone --nproc-per-node 2 -m bench.fsdp_memory ddp|fsdp
    torchrun --standalone --nproc-per-node 4 -m bench.fsdp_memory fsdp|fsdp-tp2 [small]

With tensor parallelism (fsdp-tpN) the N ranks of a group read the same batch, N times a plain rank's, so
that every layout trains on the same global batch.

Per rank: the bytes this rank holds of parameters, gradients (measured after backward, before the
optimizer clears them) and optimizer state (AdamW's two moments), counted from the local tensors
(an FSDP parameter is a DTensor: its local shard); and the process's peak RSS. Rank 0 prints one
JSON line. One strategy per process, so each peak RSS is its own.
"""
from __future__ import annotations

import ctypes
import json
import resource
import sys
import time

import torch
import torch.distributed as dist

from jobs.env import RankEnv
from jobs.gpt import gpt, lm_loss
from jobs.parallel import init_distributed, parallelize
from jobs.schema import ParallelConfig

MODEL = {"vocab": 256, "seq_len": 64, "dim": 1024, "layers": 8, "heads": 16, "tied_embeddings": False}
SMALL = {**MODEL, "dim": 64, "layers": 2, "heads": 4}  # checks that the bench runs, nothing more
BATCH = 2  # sequences per rank and step (per tensor-parallel group: BATCH x its ranks)


def local_bytes(tensors: list[torch.Tensor]) -> int:
    out = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        out += t.numel() * t.element_size()
    return out


def main(layout: str, steps: int = 4, small: bool = False) -> None:
    strategy, _, tp = layout.partition("-tp")
    tensor_parallel = int(tp or 1)
    shape = SMALL if small else MODEL
    env = RankEnv.from_environ()
    device = torch.device("cpu")
    init_distributed(env, device)
    torch.manual_seed(0)
    model = gpt(**shape)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = ParallelConfig(strategy=strategy, procs_per_node=env.world_size, tensor_parallel=tensor_parallel)
    model = parallelize(model, cfg, env, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    setup_peak = _peak_rss()
    _reset_peak_rss()  # from here on the high-water mark is the training steps' own
    gen = torch.Generator().manual_seed(env.rank // tensor_parallel)  # a group's ranks: the same batch
    times, grads = [], 0
    for step in range(steps):
        x = torch.randint(0, 256, (BATCH * tensor_parallel, shape["seq_len"] + 1), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        grads = local_bytes([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - start)
    params = local_bytes(list(model.parameters()))
    states = local_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0])
    if env.is_main:
        print(json.dumps({"strategy": layout, "ranks": env.world_size, "parameters": n_params, "param_bytes": params, "grad_bytes": grads,
                          "optimizer_bytes": states, "train_bytes": params + grads + states,
                          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "setup_peak_rss_bytes": setup_peak, "train_peak_rss_bytes": _peak_rss(),
                          "s_per_step": sorted(times[1:])[len(times[1:]) // 2]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _peak_rss() -> int:
    """The process's resident high-water mark (VmHWM) since it started or since _reset_peak_rss()."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Hand the memory freed while building back to the OS first: glibc keeps freed heap pages, and tensor
    parallelism's many chunk copies left ~170 MB more of them on a rank than FSDP alone (a 101M GPT, 4 ranks;
    after malloc_trim both held the same). Then Linux resets VmHWM to the current RSS when "5" is written to
    clear_refs (proc(5))."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


if __name__ == "__main__":
    main(sys.argv[1], small=sys.argv[2:] == ["small"])
