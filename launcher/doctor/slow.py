"""The doctor's rule for slow ranks: rank 0's slow-rank warnings (jobs.training.slow_ranks) in the last
launch's logs, one note per rank named, with how often and how much slower it was."""
from __future__ import annotations

import re

from launcher.doctor.findings import Finding, Line
from launcher.doctor.records import RunRecords

SLOW_RANK = re.compile(r"slow rank: rank (\d+) on (\S+) takes ([\d.]+|inf)x the median compute time per step of "
                       r"the other ranks \(([\d.]+ m?s) vs ([\d.]+ m?s)\) over steps (\d+)-(\d+)")

SLOW_FIX = ("every rank waits for the slowest at each step: look at that host (another process or job on its CPUs "
            "or GPU: top, nvidia-smi; a GPU held back by heat or power: nvidia-smi -q -d PERFORMANCE; a failing "
            "device), leave it out of the next allocation (Slurm: slurm.extra_sbatch=['--exclude=HOST']), and "
            "compare the ranks' compute_s/rankN in metrics.jsonl")


def slow_ranks(records: RunRecords) -> list[Finding]:
    """A note per slow rank: worth knowing (the run was slower than it needed to be), nothing failed."""
    by_rank: dict[int, list[tuple[Line, re.Match]]] = {}
    for line in (line for log in records.ranks for line in log.lines):  # not the Slurm output: the same lines again
        if m := SLOW_RANK.search(line.text):
            by_rank.setdefault(int(m.group(1)), []).append((line, m))
    found = []
    for rank, seen in sorted(by_rank.items()):
        worst = max(seen, key=lambda pair: float(pair[1].group(3)))[1]
        first, last = seen[0][1], seen[-1][1]
        times = "once" if len(seen) == 1 else f"in {len(seen)} log intervals"
        what = (f"rank {rank} on {worst.group(2)} was slow {times} between steps {first.group(6)} and "
                f"{last.group(7)}: up to {worst.group(3)}x the median compute time per step of the other ranks "
                f"({worst.group(4)} vs {worst.group(5)})")
        evidence = (seen[0][0],) if len(seen) == 1 else (seen[0][0], seen[-1][0])
        found.append(Finding(what, SLOW_FIX, evidence, failure=False))
    return found
