"""What the VM supervisor (launcher.vms.supervise) decides from its node agents' reports: when the run hangs, and
how a launch ended. Pure: no SSH, no files, so each rule is tested on its own (tests/test_vms_restarts.py).

A hang is no progress on any live rank of any node for the hang timeout. Each node agent watches only its own
ranks (VMs share no file system) and says when they have stalled for the timeout, and when they move again; the
run hangs once every node whose agent still runs says it is stalled. In lock-step training one stuck rank stops
every other at its next collective, so all nodes stall together; a node whose ranks still compute (a long step,
an evaluation on rank 0's node) keeps the run alive, whatever the others say. Each node times its ranks on its
own clock, so no two machines' clocks are compared.

How a launch ended, first match wins: cancelled; completed; a spot notice (a preemption: relaunch); the ranks
saved on a stop; a node lost (its SSH session gone, or its agent killed: the VM may be gone, so a relaunch,
which finds the hosts again); the hang the supervisor declared; a rank that crashed (an agent that exited
non-zero over a live session)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from jobs.watchdog import Hang


@dataclass
class Stalls:
    """Each node's last word on its ranks: stalled (with what its watchdog found) or moving."""

    stalled: dict[str, Hang] = field(default_factory=dict)

    def report(self, host: str, event: dict[str, Any]) -> None:
        """A node's `stalled` or `progress` event."""
        if event.get("event") == "stalled":
            self.stalled[host] = hang_of(event)
        else:
            self.stalled.pop(host, None)

    def hang(self, live: Iterable[str]) -> Optional[Hang]:
        """The run's hang if every live node is stalled (at least one), as one Hang over all their ranks:
        the shortest stall (every node has been stalled at least that long), the longest timeout."""
        live = list(live)
        if not live or any(host not in self.stalled for host in live):
            return None
        found = [self.stalled[host] for host in live]
        steps = {r: s for hang in found for r, s in hang.steps.items()}
        return Hang(tuple(sorted(steps)), min(h.stalled_s for h in found), max(h.timeout_s for h in found), steps)


def hang_of(event: dict[str, Any]) -> Hang:
    """A `stalled` event (jobs.environments.vms.hang_fields) as the Hang it describes."""
    steps = {int(r): s for r, s in (event.get("steps") or {}).items() if str(r).isdigit()}
    ranks = tuple(int(r) for r in event.get("ranks") or steps)
    return Hang(ranks, float(event.get("stalled_s") or 0.0), float(event.get("timeout_s") or 0.0),
                {r: steps.get(r) for r in ranks})


def verdict(ends: Sequence[Any], *, cancelled: bool, result: Optional[dict], hang: Optional[Hang]) -> tuple[str, str]:
    """(kind, why) of a launch's ending: "cancelled", "completed", "preemptions", "stopped", "failures",
    "hangs" or "crashes". `ends` are NodeEnd-like (host, code, error, notice); `result` is rank 0's."""
    failed = [e for e in ends if e.code != 0 or e.error]
    outcome = (result or {}).get("outcome")
    notice = next((e for e in ends if e.notice), None)
    lost = next((e for e in ends if e.error), None)
    if cancelled:
        return "cancelled", "cancelled"
    if outcome == "completed" and not failed:
        return "completed", "completed"  # a notice that came too late to matter
    if notice is not None:
        return "preemptions", f"spot notice on {notice.host} ({notice.notice})"
    if outcome == "preempted" and not failed:
        return "stopped", f"stopped by {(result or {}).get('signal')}"
    if lost is not None:  # the machine may be gone: only a relaunch finds the hosts again
        return "failures", f"node {lost.host}: {lost.error}"
    if hang is not None:
        return "hangs", hang.short()
    first = failed[0] if failed else ends[0]
    return "crashes", f"node {first.host}: exit code {first.code}"
