"""How fast this machine copies a rank's shard into host memory: the floor of a sharded async save's
blocked time (bench/shard_save.py).

    OMP_NUM_THREADS=1 python -m bench.host_copy [--mb 343] [--rounds 9]

P processes (as P ranks of one machine) stage MB of float32 tensors at the same moment, each with
ShardStager(T threads) and with torch's DefaultStager (one thread) in turns, both into buffers kept
across rounds; for P in 1, 2 and T in 1, 2. Each figure is the median over rounds 2..ROUNDS of the
slowest process's seconds. One JSON line per case. If 2 threads in 1 process are no faster than 1,
the copy is bound by memory bandwidth; if 2 processes take longer each than 1, they share it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from jobs.checkpoint.shard_staging import ShardStager

PIECES = 64  # tensors of a shard: a GPT's blocks hold a few dozen of a few MB each


def shard(mb: int) -> dict[str, torch.Tensor]:
    n = mb * 1_000_000 // 4 // PIECES
    return {f"t{i}": torch.randn(n + i) for i in range(PIECES)}  # unequal sizes, as a model's are


def worker(threads: int, mb: int, rounds: int, barrier: Any, out: Any) -> None:
    """Ours and DefaultStager in turns, each round: the machine's noise falls on both alike."""
    torch.set_num_threads(1)
    state = shard(mb)
    ours = ShardStager(threads)
    default = DefaultStager(StagingOptions(False, False, False, False))
    times: dict[str, list[float]] = {"ours": [], "default": []}
    for _ in range(rounds):
        for name, stage in (("ours", ours.stage), ("default", default.stage)):
            barrier.wait()
            start = time.perf_counter()
            stage(state)
            times[name].append(time.perf_counter() - start)
        ours.release()
    out.put(times)


def case(procs: int, threads: int, mb: int, rounds: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=worker, args=(threads, mb, rounds, barrier, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    per_proc = [out.get() for _ in workers]
    for w in workers:
        w.join()
    result: dict[str, Any] = {"processes": procs, "threads": threads, "mb_per_process": mb}
    for name in ("ours", "default"):
        slowest = [max(ts) for ts in zip(*(p[name] for p in per_proc))]
        seconds = statistics.median(slowest[1:])
        result[name] = {"copy_s": round(seconds, 4), "gb_per_s_per_process": round(mb / 1000 / seconds, 2),
                        "first_s": round(slowest[0], 4)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=343, help="MB per process (a rank's shard in bench.shard_save)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for procs in (1, 2):
        for threads in (1, 2):
            print(json.dumps(case(procs, threads, args.mb, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
