"""The doctor's rule for a run that hung: read the newest stack dump (`launcher stacks`, or the hang watchdog's
before it ended the run: `<run>/logs/stacks/<time>/rank<N>.txt`), say which rank(s) were stuck where and what
the others were waiting in, and the likely fix by what the stuck frames are: a data-loader worker, a
collective that some rank never reached, file I/O on a mount that stopped answering, a sleep or the user's
own code."""
from __future__ import annotations

import re
from typing import Optional

from jobs.stack_report import Stack, grouped, ranks_named
from launcher.doctor.findings import Finding, Line
from launcher.doctor.records import RunRecords

COLLECTIVES = frozenset({
    "all_reduce", "broadcast", "barrier", "monitored_barrier", "all_gather", "all_gather_into_tensor",
    "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather",
    "gather_object", "scatter", "scatter_object_list", "broadcast_object_list", "reduce", "send", "recv"})
DATA_LOADER = re.compile(r"torch/utils/data/|/torchdata/|_worker_loop")
FILE_IO_CALLS = re.compile(r"(^|\.)(open|read|readline|readlines|write|stat|lstat|listdir|scandir|exists|is_file|"
                           r"is_dir|read_bytes|read_text|copy|copyfile|copytree|rmtree|fsync|load|save)$")
FILE_IO_MODULES = re.compile(r"/(pathlib|shutil|os|genericpath|posixpath|glob|tempfile|_pyio)\.py$")

FIXES = {
    "data": ("a data-loader worker is stuck or deadlocked: run once with data.num_workers=0 (or num_workers=0 in "
             "the script) to see it in the rank itself; a lock or thread made before the workers forked, or a "
             "worker blocked on I/O, is the usual cause (the 'spawn' start method avoids the first)"),
    "collective": ("every rank must call the same collectives in the same order: look for a branch only some ranks "
                   "take (an `if rank == 0:` around code that calls a collective, an early break or return, ranks "
                   "with different numbers of batches: DistributedSampler with drop_last=True)"),
    "io": ("the rank is blocked in file I/O: the mount it reads or writes (NFS, Lustre, GPFS) stopped answering on "
           "that node; check it there (timeout 10 stat PATH), and keep data and checkpoints on a healthy mount or "
           "an object store (checkpoint.uri)"),
    "sleep": "the rank sleeps (its own time.sleep or a retry loop): see what it waits for at that line",
    "user": ("the rank is in its own code (a lock, a loop that never ends, a wait on something that never comes): "
             "see that line; the other ranks can only wait for it"),
}
ALL_WAITING_FIX = ("every rank is inside the same collective and none returns: a peer or the network between the "
                   "nodes was lost (NCCL_DEBUG=INFO says which), or one node's GPU or NIC is failing")


def hangs(records: RunRecords) -> list[Finding]:
    """Which rank was stuck where, what the others waited in, and the fix; nothing for a run that completed
    (a dump taken while it ran was no hang)."""
    if not records.stacks or records.info.state == "completed":
        return []
    groups = [(ranks, stack, kind_of(stack)) for ranks, stack in grouped(records.stacks)]
    stuck = [g for g in groups if g[2] != "collective"]
    waiting = [g for g in groups if g[2] == "collective"]
    evidence = tuple(filter(None, (_evidence(records, ranks, stack) for ranks, stack, _ in (stuck + waiting)[:4])))
    said = "; ".join(f"{ranks_named(r)} stuck in {s.label()}" for r, s, _ in stuck)
    if stuck and waiting:
        what = f"{said}; {_waiting(waiting)} (a rank that skipped or never reached a collective)" + \
            _recorded(records.collectives)
        return [Finding(what, f"{FIXES[stuck[0][2]]}; the others only wait for it in their collective",
                        evidence)]
    if stuck:
        return [Finding(said, FIXES[stuck[0][2]], evidence)]
    if len(waiting) > 1:
        return [Finding(f"ranks wait in different collectives: {_waiting(waiting)} (a rank skipped a collective "
                        "or called them in another order)", FIXES["collective"], evidence)]
    return [Finding(f"every rank waits in {waiting[0][1].label()}", ALL_WAITING_FIX, evidence)]


def _recorded(collectives: dict) -> str:
    """What the flight recorder adds: the collective the furthest ranks entered and the ranks that never did."""
    if len(collectives) < 2:
        return ""
    furthest = max(seq for seq, _, _ in collectives.values())
    behind = sorted(r for r, (seq, _, _) in collectives.items() if seq < furthest)
    if not behind:
        return ""
    op = next(op for seq, op, _ in collectives.values() if seq == furthest)
    ahead = sorted(r for r in collectives if r not in behind)
    return (f"; the flight recorder: {ranks_named(ahead)} entered collective #{furthest} ({op}), which "
            f"{ranks_named(behind)} never entered")


def _waiting(groups: list[tuple[list[int], Stack, str]]) -> str:
    return "; ".join(f"{ranks_named(r)} waiting in {s.label()}" for r, s, _ in groups)


def kind_of(stack: Stack) -> str:
    """What the main thread is blocked in: data, collective, io, sleep or user."""
    frames = stack.main.frames if stack.main is not None else ()
    if any(DATA_LOADER.search(f.file) or DATA_LOADER.search(f.function) for f in frames):
        return "data"
    if any(f.function in COLLECTIVES and "torch/distributed" in f.file for f in frames):
        return "collective"
    call = stack.label().split(" at ")[0]
    if call.rsplit(".", 1)[-1] in COLLECTIVES:
        return "collective"
    if FILE_IO_CALLS.search(call) or any(FILE_IO_MODULES.search(f.file) for f in frames[:3]):
        return "io"
    return "sleep" if call.endswith("sleep") else "user"


def _evidence(records: RunRecords, ranks: list[int], stack: Stack) -> Optional[Line]:
    """The dump line of the group's first rank where its labelled frame is."""
    text = records.stacks.get(ranks[0], "")
    where = re.compile(re.escape(stack.label().rpartition(" at ")[2]) + r"(?!\d)")  # train.py:7, not :70
    for number, line in enumerate(text.splitlines(), 1):
        if where.search(line.replace('", line ', ":")):
            return Line(f"{records.stacks_dir}/rank{ranks[0]}.txt", number, line)
    return None
