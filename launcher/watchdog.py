"""The supervisor's watchdog and restart budget, for any backend whose supervisor waits on the ranks
(locally the `launcher launch` process in front of torchrun: launcher.backends.local; on VMs the run's
supervisor on node 0, from its node agents' reports: launcher.vms.supervise).

Hang: no live rank's progress (jobs.progress) has changed for `resilience.hang_timeout_s` (default
max(300 s, 20 x the slowest step any rank measured)). Progress is a new step report; before a rank's first
report (startup, a compile, a plain script that reports no steps) it is the rank's CPU time or its log
growing. A rank whose process has ended is not hung. Changes are timed on this process's own monotonic
clock, so nothing depends on the ranks' clocks. On a hang every rank's stack is dumped (jobs.stacks) into
`<run>/logs/stacks/hang-<attempt>/`, a line naming the hung ranks goes into `launcher logs`, and the
ranks are killed: a hung rank would never act on a polite SIGTERM, and the others wait on it.

Restarts inside the allocation are counted per kind ("hangs", "crashes") in run.json's
`inplace_restarts`, each against its own budget (resilience.max_hang_restarts / max_crash_restarts)."""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

from jobs import stacks
# the core lives in the jobs plane, where each VM's node agent runs it too; re-exported for this plane
from jobs.watchdog import Hang, Watchdog, descendants, rank_processes  # noqa: F401
from jobs.schema.resilience import ResilienceConfig
from jobs.schema.run_dir import CHECKPOINTS, RESULT_JSON, Run, RunInfo, committed_steps

KINDS = {"hangs": "max_hang_restarts", "crashes": "max_crash_restarts"}  # kind -> its budget's key


def end_hung_attempt(run: Run, watchdog: Watchdog, hang: Hang, root: int, attempt: int) -> None:
    """Dump every rank's stack, say which ranks hung, then kill the attempt's whole process tree."""
    dest = run.stacks_dir(attempt)
    stacks.dump(watchdog.pids(), dest)
    run.note(f"{hang.line()}; stacks of every rank in {dest.relative_to(run.dir)}/")
    for pid in [*descendants(root), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def budget_left(cfg: ResilienceConfig, counts: dict, kind: str) -> tuple[bool, int]:
    """Whether one more restart of `kind` is allowed after `counts` so far, and the limit."""
    limit = getattr(cfg, KINDS[kind])
    return counts.get(kind, 0) < limit, limit


def restart_or_stop(run: Run, cfg: ResilienceConfig, kind: str, why: str,
                    note: Optional[Callable[[str], None]] = None) -> tuple[bool, Optional[str]]:
    """Count a restart of `kind` and prepare it (True), or, past its budget, record why the run stops
    (False). The line said comes back too; None for a crash with no budget asked for, which the backend
    handles as it always did (locally the run fails; on VMs a failure, relaunched within vms.max_failures).
    `note` puts a line into `launcher logs` (default: rank 0's log in `run`)."""
    note = note or run.note
    counts = dict(run.info().inplace_restarts)
    allowed, limit = budget_left(cfg, counts, kind)
    event = "hung" if kind == "hangs" else "crashed"
    if not allowed:
        if kind == "crashes" and limit == 0:
            return False, None
        message = f"not restarted: {kind} limit of {limit} reached (resilience.{KINDS[kind]}); last: {why}"
        run.update(inplace_stop=message)
        note(f"{event}; {message}")
        return False, message
    counts[kind] = counts.get(kind, 0) + 1
    steps = committed_steps(run.dir / CHECKPOINTS)
    start = f"checkpoint step-{steps[-1]}" if steps else "the newest committed checkpoint, if any"
    # the restart continues the run whatever --resume said: it is the same launch, started again
    run.update(inplace_restarts=counts, resume="auto", state="restarting", remove=("exit_code", "failed_rank"))
    (run.dir / RESULT_JSON).unlink(missing_ok=True)  # the failed attempt's
    line = f"{event} ({why}); restarting every rank in place from {start} ({kind} {counts[kind]}/{limit})"
    note(line)
    return True, line


def status_fields(info: RunInfo, live: bool) -> dict[str, Any]:
    """What `launcher status` shows of the restarts inside the allocation on any backend: the count by kind,
    and, once the run has ended, why it was not restarted again."""
    history = {"restarts": ", ".join(f"{kind} {n}" for kind, n in info.inplace_restarts.items())} \
        if info.inplace_restarts else {}
    stopped = {"stop_reason": info.inplace_stop} if info.inplace_stop and not live else {}
    return {**history, **stopped}
