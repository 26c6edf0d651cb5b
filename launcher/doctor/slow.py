"""The doctor's rule for slow ranks: rank 0's slow-rank warnings (jobs.training.slow_ranks) in the last
launch's logs, one note per rank and kind (slow compute, or slow data) named, with how often and how much
slower it was and, from the worst interval, where its step time went."""
from __future__ import annotations

import re

from launcher.doctor.findings import Finding, Line
from launcher.doctor.records import RunRecords

# "its step: ..." is absent from the warnings of launches before the step was split (issue 24)
SLOW_RANK = re.compile(r"slow rank: rank (\d+) on (\S+) (?:takes|waits) ([\d.]+|inf)x (the median (compute time|time "
                       r"for data) per step of the other ranks) \(([\d.]+ m?s) vs ([\d.]+ m?s)\) over steps "
                       r"(\d+)-(\d+)(?:; its step: (.*))?")

SLOW_FIX = ("every rank waits for the slowest at each step: look at that host (another process or job on its CPUs "
            "or GPU: top, nvidia-smi; a GPU held back by heat or power: nvidia-smi -q -d PERFORMANCE; a failing "
            "device), leave it out of the next allocation (Slurm: slurm.extra_sbatch=['--exclude=HOST']), and "
            "compare the ranks' compute_s/rankN in metrics.jsonl")
DATA_FIX = ("every rank waits at the gradient all-reduce for the one still loading its batches: look at that "
            "host's storage (a slow or failing disk, a hung or overloaded NFS mount: iostat -x, nfsstat, dmesg) "
            "and its CPUs (data.num_workers loader processes competing with another job), leave it out of the "
            "next allocation (Slurm: slurm.extra_sbatch=['--exclude=HOST']), and compare the ranks' data_s/rankN "
            "in metrics.jsonl")


def slow_ranks(records: RunRecords) -> list[Finding]:
    """A note per slow rank and kind: worth knowing (the run was slower than it needed to be), nothing failed."""
    seen: dict[tuple[int, str], list[tuple[Line, re.Match]]] = {}
    for line in (line for log in records.ranks for line in log.lines):  # not the Slurm output: the same lines again
        if m := SLOW_RANK.search(line.text):
            seen.setdefault((int(m.group(1)), m.group(5)), []).append((line, m))
    return [_finding(rank, kind, hits) for (rank, kind), hits in sorted(seen.items())]


def _finding(rank: int, kind: str, hits: list[tuple[Line, re.Match]]) -> Finding:
    worst = max(hits, key=lambda pair: float(pair[1].group(3)))[1]
    first, last = hits[0][1], hits[-1][1]
    times = "once" if len(hits) == 1 else f"in {len(hits)} log intervals"
    split = f"; its step then: {worst.group(10)}" if worst.group(10) else ""
    what = (f"rank {rank} on {worst.group(2)} was slow {times} between steps {first.group(8)} and "
            f"{last.group(9)}: up to {worst.group(3)}x {worst.group(4)} ({worst.group(6)} vs {worst.group(7)})"
            f"{split}")
    evidence = (hits[0][0],) if len(hits) == 1 else (hits[0][0], hits[-1][0])
    return Finding(what, DATA_FIX if kind == "time for data" else SLOW_FIX, evidence, failure=False)
