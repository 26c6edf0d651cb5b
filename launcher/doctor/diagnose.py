"""From a run's records to findings: pure functions of log text and run records, one per kind of failure,
grouped by family (oom, device, collectives, hangs, storage; requeues here).

Every rule looks at the last launch only (`records`), quotes the lines it relied on as file:line, and says
what to do in the launcher's own terms (`trainer.micro_batch=auto`, `slurm.time_min`, ...). The messages
matched are torch's, NCCL's, gloo's, botocore's and the OS's own, as the ranks log them.
"""
from __future__ import annotations

from typing import Callable

from launcher.doctor.collectives import collective_failure, rendezvous
from launcher.doctor.device import cudnn_not_initialized, label_out_of_range
from launcher.doctor.findings import Finding
from launcher.doctor.hangs import hangs
from launcher.doctor.oom import out_of_memory
from launcher.doctor.raised import script_failures, traceback_failures
from launcher.doctor.ranks import first_stop
from launcher.doctor.records import RunRecords
from launcher.doctor.slow import slow_ranks
from launcher.doctor.storage import disk_full, store_down


def requeues(records: RunRecords) -> list[Finding]:
    """Preemptions, time limits and crashes counted by the Slurm job (run.json), and a run stopped by a signal."""
    info, result = records.info, records.result
    counts = {k: v for k, v in info.requeues.items() if isinstance(v, int) and v > 0}
    found = []
    if counts or info.stop_reason:
        said = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no requeues"
        stopped = info.stop_reason is not None
        what = f"Slurm requeued the run: {said}" + (f"; then {info.stop_reason}" if stopped else "")
        found.append(Finding(what, _requeue_fix(records, counts, stopped), failure=stopped))
    elif result.outcome == "preempted" and result.signal:
        found.append(Finding(f"the run was stopped by {result.signal} at step {result.step} after saving a "
                             "checkpoint", "nothing is lost: the same launch command resumes it", failure=False))
    return found


def _requeue_fix(records: RunRecords, counts: dict, stopped: bool) -> str:
    slurm = records.cluster.get("slurm") if isinstance(records.cluster.get("slurm"), dict) else {}
    tips = []
    if counts.get("timeouts"):
        tips.append(f"it reached the time limit {counts['timeouts']} time(s): raise slurm.time_min (now "
                    f"{slurm.get('time_min', '?')} min) so that one job does more")
    if counts.get("preemptions"):
        tips.append("preemptions are the partition's doing: a partition or QOS that is not preemptible avoids them")
    if counts.get("failures"):
        tips.append("a failure is a crash: see the errors above and the failures/ records")
    if stopped:
        tips.append("after raising the slurm.max_* limit it names, the same launch command resumes the run")
    return "; ".join(tips) or "nothing to do: every requeue resumed from the newest checkpoint"


def unread_files(records: RunRecords) -> list[Finding]:
    """Records and logs that could not be read (damaged, or no regular file): what they held is not diagnosed."""
    return [Finding(f"{what}: not read, so not diagnosed", "the launcher writes these as plain JSON and text "
                    "files: repair this one or move it aside", failure=False)
            for what in records.unread]


def collective_unless_hung(records: RunRecords) -> list[Finding]:
    """A collective's timeout, unless stack dumps show the hang behind it: they name the rank and the line."""
    return [] if hangs(records) else collective_failure(records)


RULES: tuple[Callable[[RunRecords], list[Finding]], ...] = (
    out_of_memory, script_failures, label_out_of_range, cudnn_not_initialized, rendezvous, disk_full, store_down,
    hangs, collective_unless_hung, requeues, unread_files, slow_ranks)


def diagnose(records: RunRecords) -> list[Finding]:
    """Every rule's findings; a launch that failed for no reason a rule knows gets the first error it logged."""
    found = [finding for rule in RULES for finding in rule(records)]
    if not any(f.failure for f in found):
        found += unexplained_failure(records)
    return found


def unexplained_failure(records: RunRecords) -> list[Finding]:
    """The ranks' tracebacks, else the first error a rank logged, else the run's exit code."""
    if records.ended_well:
        return []
    raised = traceback_failures(records)
    if raised:
        return raised
    first, info = first_stop(records), records.info
    if first is not None and first.lines:
        return [Finding(f"{first.named()} failed first: {first.lines[0].text.split(': ', 2)[-1].strip()[:200]}",
                        f"read its traceback: launcher logs {records.name} --rank {first.ranks[0]}", first.lines)]
    if info.state in ("failed", "stopped") or (info.exit_code or 0) != 0:
        code = f" with exit code {info.exit_code}" if info.exit_code is not None else ""
        return [Finding(f"the run failed{code}, and no rank logged an error", "a rank was killed before it could "
                        "log (the kernel's out-of-memory killer: dmesg; on Slurm sacct -j JOB), or it failed before "
                        "its log started: see the launch's console output or the Slurm job's output file")]
    return []
