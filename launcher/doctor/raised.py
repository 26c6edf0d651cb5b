"""The doctor's rules for the exceptions a rank raised: the script failures every new user meets (a CUDA
call without a GPU, NCCL on the CPU, torchrun's variables missing) with their one-line fix, and any
other traceback named by its exception line and the user's own line (`train.py:85`).

Ranks that failed the same way (the same failure at the same line) are one finding that names them all."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from launcher.doctor.findings import Finding
from launcher.doctor.ranks import SECONDARY, lines_matching, on_rank
from launcher.doctor.records import RunRecords
from launcher.doctor.tracebacks import Traceback, content, last_by_rank, shown, user_frame, users

CUDA_MISSING = re.compile(r"has no attribute '_cuda_\w+'|Torch not compiled with CUDA enabled|No CUDA GPUs are "
                          r"available|Found no NVIDIA driver|CUDA driver initialization failed|no CUDA-capable device")


@dataclass(frozen=True)
class Known:
    """A failure known by its message: what it means and the fix, one line each."""

    pattern: re.Pattern
    what: str
    fix: str


KNOWN = (
    Known(CUDA_MISSING, "a CUDA call on a machine without a GPU",
          "use the device torch finds (device = 'cuda' if torch.cuda.is_available() else 'cpu', and call "
          "torch.cuda.set_device only on CUDA), or launch on a cluster config whose nodes have GPUs (--cluster C)"),
    Known(re.compile(r"ProcessGroupNCCL is only supported with GPUs|Distributed package doesn't have NCCL built in|"
                     r"NCCL is not available"), "NCCL, the GPU backend, asked for on a machine without a GPU",
          "use backend gloo on the CPU: dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')"),
    Known(re.compile(r"environment variable (?:MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE) expected, but not set|"
                     r"^KeyError: '(?:RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)'"),
          "the script was started without torchrun's variables (RANK, MASTER_ADDR, ...)",
          "start it with `launcher run train.py ...`, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
          "MASTER_PORT on every rank, not `python train.py`; under `launcher run`, a process the script starts "
          "itself must inherit the environment (no env={...}, no env -i)"),
    Known(re.compile(r"Attempting to deserialize object on a CUDA device"),
          "a checkpoint saved on a GPU loaded on a machine without one",
          "load it onto the CPU: torch.load(path, map_location='cpu'), or run on GPUs"),
    Known(re.compile(r"invalid device ordinal"), "a rank asked for a GPU the node does not have",
          "run at most one rank per GPU (parallel.procs_per_node, --procs-per-node; nvidia-smi -L lists them) and "
          "pick the device by LOCAL_RANK, not RANK"),
)
NCCL_ERROR = re.compile(r"NCCL error|ncclSystemError|ncclInternalError|ncclInvalidUsage")
NCCL_ON_CPU = KNOWN[1]


def known_failure(said: str, records: RunRecords) -> Optional[Known]:
    for known in KNOWN:
        if known.pattern.search(said):
            return known
    if NCCL_ERROR.search(said) and lines_matching(records, CUDA_MISSING):  # an NCCL error with no GPU in sight
        return NCCL_ON_CPU
    return None


def script_failures(records: RunRecords) -> list[Finding]:
    """The known failures among the ranks' last tracebacks (or, without a traceback, a line that says one)."""
    if records.ended_well:
        return []
    failed = _primary(records)
    known = [(tb, k) for tb in failed if (k := known_failure(tb.said, records))]
    if known:
        return [_finding(records, group, k) for group, k in _same_way(records, [tb for tb, _ in known])]
    if failed:  # tracebacks of other kinds: unexplained_failure names them if no other rule does
        return []
    for k in KNOWN:
        hits = [line for line in records.lines() if k.pattern.search(content(line))]
        if hits:
            return [Finding(f"{k.what}{on_rank(hits[0])}: {content(hits[0])}", k.fix, (hits[0],))]
    return []


def traceback_failures(records: RunRecords) -> list[Finding]:
    """The ranks' tracebacks no rule knew, each named by its exception line and the user's line."""
    return [_finding(records, group, None) for group, _ in _same_way(records, _primary(records))]


def _primary(records: RunRecords) -> list[Traceback]:
    """Each rank's last traceback, once the run did not complete; the ranks that only lost the others left
    out when another rank has an error of its own. The first rank that failed (run.json) comes first."""
    if records.ended_well:
        return []
    found = last_by_rank(records)
    own = [tb for tb in found if not SECONDARY.search(tb.said)]
    first = records.info.failed_rank
    return sorted(own or found, key=lambda tb: (tb.rank != first, tb.rank if tb.rank is not None else -1))


def _same_way(records: RunRecords, tbs: Sequence[Traceback]) -> list[tuple[list[Traceback], Optional[Known]]]:
    """Tracebacks grouped by what failed where: the known failure (or the exception line) and the user's line."""
    groups: dict[tuple, list[Traceback]] = {}
    for tb in tbs:
        k = known_failure(tb.said, records)
        key = (k.what if k else tb.said, user_frame(tb, records.info.code_dir).where)
        groups.setdefault(key, []).append(tb)
    return [(group, known_failure(group[0].said, records)) for group in groups.values()]


def _finding(records: RunRecords, group: list[Traceback], known: Optional[Known]) -> Finding:
    code_dir = records.info.code_dir
    tb, ranks = group[0], sorted(t.rank for t in group if t.rank is not None)  # the first that failed: group[0]
    frame, evidence = user_frame(tb, code_dir), (group[0].exception, user_frame(group[0], code_dir).logged)
    named = "a rank" if not ranks else f"rank {ranks[0]}" if len(ranks) == 1 else \
        f"ranks {', '.join(map(str, ranks))}"
    at = shown(frame, code_dir)
    if known is not None:
        return Finding(f"{known.what} on {named}: {tb.said} at {at}", known.fix, evidence)
    rank = f" --rank {ranks[0]}" if ranks else ""
    mine = f"your code's last line in it is {at}" if users(frame.file, code_dir) else \
        f"none of its frames is in your code, the innermost is {at}"
    return Finding(f"{named} failed: {tb.said} at {at}",
                   f"{mine}; the whole traceback: launcher logs {records.name}{rank}", evidence)
