"""The doctor's rules for ranks that lost each other: a collective that timed out or lost a peer (and the
rank that stopped first), a rendezvous that failed (port in use, nodes that never met)."""
from __future__ import annotations

import re
from typing import Optional

from launcher.doctor.findings import Finding, Line
from launcher.doctor.ranks import first_stop, lines_matching, on_rank, rank_of
from launcher.doctor.records import RunRecords

NCCL_TIMEOUT = re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+)"
                          r"(?:.*?Timeout\(ms\)=(\d+))?")
GLOO_TIMEOUT = re.compile(r"Timed out waiting (\d+) ?ms for (\w+) operation")
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|remote process exited or there was a "
                       r"network error|ncclRemoteError")


def collective_failure(records: RunRecords) -> list[Finding]:
    """A collective that timed out or lost a peer, when no rank reported an error of its own (that error
    is the finding then): name the rank that stopped first."""
    timeouts = lines_matching(records, NCCL_TIMEOUT) + lines_matching(records, GLOO_TIMEOUT)
    lost = lines_matching(records, PEER_LOST)
    first = first_stop(records)
    if not (timeouts or lost) or (first is not None and first.how == "error"):
        return []
    behind = _behind(records, timeouts)
    if behind is not None:
        return [behind]
    symptom = _timeout_said(timeouts[0]) if timeouts else f"{rank_of(lost[0])} lost its connection to it"
    evidence = (timeouts or lost)[:1]
    if first is None:
        return [Finding(symptom, "look at every rank's log (launcher logs RUN --rank N) for the one that stopped "
                        "first", tuple(evidence))]
    if first.how == "silent":
        ends = ", ".join(f"{line.where}" for line in first.lines)
        what = f"{first.named()} stopped first: its log ends ({ends}) without an error, and then {symptom}"
        return [Finding(what, _stopped_fix(first.named()), (*first.lines, *evidence))]
    return [Finding(f"{symptom}; the first to report it was {first.named()}", WAITED_FIX,
                    (*first.lines[:1], *evidence[:1]))]


WAITED_FIX = ("every rank only reports waiting for the others: look for a rank that fell behind (a slow or hung "
              "data loader, a save or an evaluation only some ranks run, a node with a failing GPU or network: "
              "NCCL_DEBUG=INFO says more)")


def _stopped_fix(named: str) -> str:
    return (f"{named} was killed or hung: a SIGKILL from the kernel's out-of-memory killer (dmesg | grep -i "
            "'killed process'; on Slurm sacct -j JOB -o JobID,State,MaxRSS), the scheduler or a person, a node "
            "that died, or a hang in data loading or in code only some ranks run; if host memory ran out, lower "
            "data.num_workers or trainer.micro_batch")


WAITING_RANK = re.compile(r"\[Rank (\d+)\] Watchdog caught")
WORLD = re.compile(r"rank \d+ of (\d+) on ")


def _behind(records: RunRecords, timeouts: list[Line]) -> Optional[Finding]:
    """The ranks that did not report a timed-out collective while others did: they never reached it."""
    waiting = set()
    for line in timeouts:
        m = WAITING_RANK.search(line.text) or re.search(r"rank(\d+)", line.path)
        if m:
            waiting.add(int(m.group(1)))
    world = {log.rank for log in records.ranks}
    for line in records.lines():
        if m := WORLD.search(line.text):
            world |= set(range(int(m.group(1))))
            break
    behind = sorted(world - waiting)
    if not waiting or not behind:
        return None
    named = f"rank {behind[0]}" if len(behind) == 1 else "ranks " + ", ".join(map(str, behind))
    last = [log.lines[-1] for log in records.ranks if log.rank in behind and log.lines]
    where = f": its log ends at {', '.join(line.where for line in last)}" if last else ""
    what = f"{_timeout_said(timeouts[0])}; {named} never reached it (no timeout reported there){where}"
    return Finding(what, _stopped_fix(named), (timeouts[0], *last))


def _timeout_said(line: Line) -> str:
    if m := NCCL_TIMEOUT.search(line.text):
        limit = f" after {int(m.group(3)) // 1000} s" if m.group(3) else ""
        return f"an NCCL {m.group(2)} (collective number {m.group(1)}) timed out{on_rank(line)}{limit}"
    m = GLOO_TIMEOUT.search(line.text)
    return f"a gloo {m.group(2) if m else ''} timed out{on_rank(line)} after {int(m.group(1)) // 1000 if m else '?'} s"


PORT_IN_USE = re.compile(r"EADDRINUSE|[Aa]ddress already in use|server socket has failed to listen")
RDZV_TIMEOUT = re.compile(r"RendezvousTimeoutError|client socket has timed out after|RendezvousConnectionError")
PORT = re.compile(r"port: (\d+)|:(\d+) \(errno: 98|rendezvous [\w.-]+:(\d+)")


def rendezvous(records: RunRecords) -> list[Finding]:
    busy, late = lines_matching(records, PORT_IN_USE), lines_matching(records, RDZV_TIMEOUT)
    if busy:
        port = _port(records, busy[0])
        return [Finding(f"the rendezvous port{f' {port}' if port else ''} was already in use{on_rank(busy[0])}: "
                        "the ranks could not start their process group",
                        f"another process holds the port on node 0 (a previous run that never exited, another job "
                        f"on the node): find it with ss -ltnp | grep :{port or 'PORT'} and stop it, then launch again "
                        "(a local run takes a free port at each launch; on Slurm the port is 20000 + job id mod "
                        "20000; on VMs set vms.rdzv_port)", (busy[0],))]
    if late:
        return [Finding(f"the ranks could not meet at the rendezvous{on_rank(late[0])}",
                        "node 0 (MASTER_ADDR) was not reachable from the other nodes in time: check that node 0 "
                        "started, that the nodes reach each other on the rendezvous port (firewall, security "
                        "group), and that every node runs the same launch", (late[0],))]
    return []


def _port(records: RunRecords, line: Line) -> Optional[str]:
    for text in [line.text] + [ln.text for ln in records.lines() if "rendezvous" in ln.text]:
        if m := PORT.search(text):
            return next(g for g in m.groups() if g)
    return None
