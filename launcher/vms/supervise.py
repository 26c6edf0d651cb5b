"""The run's supervisor: runs on node 0's VM, detached from the SSH session that started it, so the
user's machine can disconnect. `python -m launcher.vms.supervise --run-dir DIR --self ADDR`.

Each launch: find the hosts (vms.hosts, or vms.hosts_command again, so replacement VMs are found),
bring each one the code and the run's files (a replacement VM has neither), start one node agent per
host over SSH (`jobs.environments.vms`), and follow their events. What ends a launch decides the next:
- every node exited 0 and rank 0's result says completed: the run is completed;
- a spot notice on any node: the ranks saved together; a preemption is counted and the run relaunched;
- a node's SSH session was lost (the VM is gone), or a node's agent failed and `resilience.max_crash_restarts`
  is 0: the other nodes are told to stop, then killed after `KILL_AFTER_S` (their collectives can never
  finish), a failure is counted, and the run relaunched;
- every node's agent reported its ranks stalled (launcher.vms.restarts): the run hangs. Each node dumps its
  ranks' stacks (node 0 gets them all, in `logs/stacks/hang-<attempt>/`) and kills them; then, within
  `resilience.max_hang_restarts`, every node agent starts again on the same hosts (no host lookup, no copying),
  from the newest committed checkpoint: a restart in place, counted in run.json's `inplace_restarts`;
- a rank crashed (an agent exited non-zero over a live session) with `resilience.max_crash_restarts` > 0: the
  same restart in place, against that budget; past either budget the run stops as failed (`inplace_stop`);
- SIGTERM to this process (`launcher cancel`): every node saves and stops; the run is cancelled.
Preemptions and failures have separate budgets (vms.max_preemptions, vms.max_failures), as on Slurm;
before a relaunch the supervisor waits up to vms.host_wait_s for every host to answer. Each hang, restart or
stop is a line in `launcher logs` (rank 0's log on the host that ran rank 0; node 0's where that host is
unreachable).

State goes into node 0's run.json (state, launches, hosts, placement of ranks, requeues by kind,
last_requeue, stop_reason, inplace_restarts, inplace_stop) and rank 0's result.json is copied next to it,
wherever rank 0 ran.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.vms import layout
from launcher.vms.hosts import launch_size, listed_hosts, resize_line
from launcher.vms.restarts import Stalls, verdict
from launcher.vms.ssh import HostSpec, connect, host_specs, run as run_remote, sync_tree_async
from launcher.vms.state import VmState
from jobs.watchdog import KINDS, restart_or_stop
from jobs.schema import UsageError
from jobs.schema.run_dir import CLUSTER_YAML, Run, RunResult, note_line, rank_log
from jobs.stacks import save as save_stacks
from jobs.watchdog import Hang
from jobs.schema.vms import VmsConfig

log = logging.getLogger("launcher.vms")
KILL_AFTER_S = 30.0  # a stopped node whose ranks wait on a dead peer is killed after this long
KEEPALIVE = (5, 3)  # interval (s), missed answers: a vanished VM's session is closed within ~15 s
RESTART, RELAUNCH, END = "restart", "relaunch", "end"  # what follows a launch's ending (Supervisor.decide)


@dataclass
class NodeEnd:
    """How one node's agent ended."""

    host: str
    code: Optional[int] = None  # the agent's exit status; None: the SSH session was lost
    ranks: list[int] = field(default_factory=list)
    result: Optional[dict[str, Any]] = None
    notice: Optional[dict[str, Any]] = None
    error: str = ""


class Supervisor:
    def __init__(self, run: Run, me: str) -> None:
        self.run = run
        self.me = me
        self.recipe, self.cluster = run.recipe(), run.cluster()
        assert self.cluster.vms is not None, "a vms run's cluster.yaml has a vms: section"
        self.cfg: VmsConfig = layout.supervisor_view(self.cluster.vms, run.dir)
        self.cancelled = asyncio.Event()
        self.nodes: dict[str, Any] = {}  # host -> asyncssh process of its agent, during a launch
        self.notice_at: Optional[float] = None  # when this launch's first preemption notice arrived
        self.kill_timer: Optional[asyncio.TimerHandle] = None  # kills the nodes a failed one left waiting
        self.attempt = 0  # starts of the node agents by this supervisor: hang-<attempt> names a hang's stacks
        self.live: set[str] = set()  # hosts whose agent runs, during an attempt
        self.stalls = Stalls()  # each node's last word on its ranks' progress, during an attempt
        self.hang: Optional[Hang] = None  # the hang declared in this attempt
        self.stacks: dict[int, str] = {}  # rank -> its stack, from every node, on a hang
        self.notes: list[str] = []  # lines for `launcher logs`, written once the attempt has ended (forward_notes)

    # ------------------------------------------------------------------ the loop
    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.cancel)
        launch = VmState.of(self.run.info()).launches
        self.run.update(remove=("inplace_restarts", "inplace_stop"))  # each `launcher launch` has its whole budget
        while True:
            hosts = await self.wait_for_hosts()
            if hosts is None:
                return
            launch += 1
            self.run.update(state="running", **VmState.entries(launches=launch, hosts=hosts))
            if await self.attempts(hosts, launch) == END:
                return

    async def attempts(self, hosts: list[str], launch: int) -> str:
        """Start the node agents on `hosts` again and again while each ending is a restart in place (the same
        hosts, nothing copied again); what follows the last: RELAUNCH or END."""
        while True:
            self.notice_at = None
            ends = await self.launch(hosts, launch)
            then = self.decide(ends)
            await self.forward_notes(ends)
            if then != RESTART:
                return then
            if self.cancelled.is_set():  # cancelled while the attempt ended: nothing runs, nothing to save
                self.run.update(state="cancelled")
                return END

    def cancel(self) -> None:
        log.info("cancel: telling every node to save and stop")
        self.cancelled.set()
        for proc in self.nodes.values():
            _order(proc, "stop")

    async def wait_for_hosts(self) -> Optional[list[str]]:
        """The hosts of the next launch, answering over SSH: every one of parallel.nodes, or after vms.host_wait_s
        as many as answer if they are at least vms.min_nodes; None once vms.host_wait_s has passed without."""
        nodes, deadline = self.recipe.parallel.nodes, time.monotonic() + self.cfg.host_wait_s
        while not self.cancelled.is_set():
            waited_out = time.monotonic() > deadline
            try:
                first = self.cfg.host_offset  # a sweep worker's slot of the pool
                answering, why = await self.answering(listed_hosts(self.cfg, CLUSTER_YAML)[first:first + nodes])
                size = launch_size(len(answering), nodes, self.cfg.min_nodes, waited_out)
                if size is not None:
                    self.resized(size)
                    return answering[:size]
            except (UsageError, OSError) as err:
                why = str(err)
            if waited_out:
                self.stop(f"hosts did not come back within vms.host_wait_s={self.cfg.host_wait_s} s: {why}")
                return None
            self.run.update(state="waiting_for_hosts", **VmState.entries(waiting_for=why))
            log.info("waiting for hosts: %s", why)
            await asyncio.sleep(5)
        self.stop("cancelled while waiting for hosts", state="cancelled")
        return None

    async def answering(self, hosts: list[str]) -> tuple[list[str], str]:
        """The `hosts` that answer, prepared (node 0's order kept), and why the others do not."""
        tried = await asyncio.gather(*(self.prepare(spec) for spec in host_specs(self.cfg, hosts)),
                                     return_exceptions=True)
        for err in tried:
            if isinstance(err, BaseException) and not isinstance(err, (UsageError, OSError)):
                raise err
        why = "; ".join(f"{h}: {err}" for h, err in zip(hosts, tried) if isinstance(err, BaseException))
        return [h for h, err in zip(hosts, tried) if err is None], why or \
            f"{len(hosts)} of the {self.recipe.parallel.nodes} hosts are listed: {', '.join(hosts) or 'none'}"

    def resized(self, size: int) -> None:
        """A launch on another number of VMs than the last one (vms.min_nodes): a line in the logs, counted."""
        state = VmState.of(self.run.info())
        line = resize_line(state.nodes or self.recipe.parallel.nodes, size, self.recipe, self.cfg)
        if line is not None:
            self.note(line)
            self.run.update(**VmState.entries(nodes=size, resizes=state.resizes + 1))

    async def prepare(self, spec: HostSpec) -> None:
        """The code and the run's files on `spec`'s host (node 0 has them: this process runs there)."""
        if spec.address == self.me:
            return
        conn = await connect(spec)
        async with conn:
            if self.cfg.code == "sync":
                await sync_tree_async(conn, layout.code_files(self.run), layout.host_code_dir(self.cfg, spec.address))
            with tempfile.TemporaryDirectory() as staging:
                await sync_tree_async(conn, layout.run_files(self.run, self.cfg, spec.address, Path(staging)),
                                      layout.host_run_dir(self.cfg, spec.address, self.run.name))

    # ------------------------------------------------------------------ one launch
    async def launch(self, hosts: list[str], launch: int) -> list[NodeEnd]:
        p = self.recipe.parallel
        self.attempt += 1
        self.stalls, self.hang, self.stacks = Stalls(), None, {}
        rdzv = f"{hosts[0]}:{self.cfg.rdzv_port}"
        # a new rendezvous per start: a restart in place must never meet the killed attempt's state
        rdzv_id = f"{self.run.info().run_id or self.run.name}-{launch}-{self.attempt}"
        restarts = sum(self.run.info().inplace_restarts.values())
        log.info("launch %d (attempt %d) on %s (rendezvous %s)", launch, self.attempt, ", ".join(hosts), rdzv)
        self.run.update(state="running")

        async def node(spec: HostSpec) -> NodeEnd:
            command = layout.agent_command(self.cfg, self.run.name, spec.address, len(hosts), p.procs_per_node,
                                           rdzv, rdzv_id, restarts)
            return await self.follow(spec, command)

        tasks = [asyncio.create_task(node(spec)) for spec in host_specs(self.cfg, hosts)]
        ends: list[NodeEnd] = []
        for next_done in asyncio.as_completed(tasks):
            end = await next_done
            ends.append(end)
            if (end.code != 0 or end.error) and len(ends) < len(tasks) and not self.cancelled.is_set() \
                    and self.hang is None:  # on a hang every node kills its own ranks already
                await self.stop_others(end)
        self.nodes.clear()
        if self.kill_timer is not None:
            self.kill_timer.cancel()
            self.kill_timer = None
        return ends

    async def follow(self, spec: HostSpec, command: str) -> NodeEnd:
        end = NodeEnd(spec.address)
        try:
            conn = await connect(spec)
            conn.set_keepalive(*KEEPALIVE)
        except UsageError as err:
            end.error = str(err)
            return end
        async with conn:
            proc = await conn.create_process(command)
            self.nodes[spec.address] = proc
            self.live.add(spec.address)
            if self.cancelled.is_set():
                _order(proc, "stop")
            try:
                async for line in proc.stdout:
                    self.on_event(end, line)
                done = await proc.wait()
                end.code = done.exit_status if done.exit_status is not None else None
            except Exception as err:  # noqa: BLE001 - asyncssh.ConnectionLost and friends: the VM is gone
                end.error = f"lost the SSH session to {spec.address}: {err}"
            finally:
                self.live.discard(spec.address)
                self.check_hang()  # the nodes left may all be stalled
        if end.code is None and not end.error:
            end.error = f"the node agent on {spec.address} ended without an exit status (killed by a signal?)"
        log.info("node %s ended: code %s %s", spec.address, end.code, end.error)
        return end

    def on_event(self, end: NodeEnd, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            log.info("%s: %s", end.host, line.rstrip())  # the setup lines' own output
            return
        kind = event.get("event")
        if kind == "notice":
            log.info("spot notice on %s: %s", end.host, event)
            if event.get("kind") == "preemption" and self.notice_at is None:
                self.notice_at = time.monotonic()
            self.run.update(**VmState.entries(last_notice={**event, "at": time.time()}))
        elif kind in ("stalled", "progress"):
            log.info("%s: %s", end.host, line.strip())
            self.stalls.report(end.host, event)
            self.check_hang()
        elif kind == "stacks" and isinstance(event.get("stacks"), dict):
            self.stacks.update({int(r): str(t) for r, t in event["stacks"].items() if str(r).isdigit()})
        elif kind == "exit":
            end.ranks, end.result, end.notice = event.get("ranks", []), event.get("result"), event.get("notice")

    def check_hang(self) -> None:
        """Every live node stalled: the run hangs. Each node dumps its ranks' stacks, then kills them."""
        hang = None if self.hang or self.cancelled.is_set() else self.stalls.hang(self.live)
        if hang is None:
            return
        self.hang = hang
        log.info("%s: every node dumps its ranks' stacks and kills them", hang.line())
        for proc in self.nodes.values():
            _order(proc, f"hang {self.attempt}")

    async def stop_others(self, failed: NodeEnd) -> None:
        """A node failed: the others cannot finish a collective without it. Stop them, then kill."""
        log.info("node %s failed (%s): stopping the other nodes", failed.host, failed.error or f"code {failed.code}")
        for proc in self.nodes.values():
            _order(proc, "stop")
        await asyncio.sleep(0)
        if self.kill_timer is None:  # this launch's nodes only: the timer is cancelled when the launch ends
            self.kill_timer = asyncio.get_running_loop().call_later(
                KILL_AFTER_S, lambda: [_order(p, "kill") for p in list(self.nodes.values())])

    # ------------------------------------------------------------------ deciding
    def decide(self, ends: list[NodeEnd]) -> str:
        """Record how the attempt ended; what follows: RESTART (in place), RELAUNCH or END."""
        result = next((e.result for e in ends if e.result), None)
        if result is not None:
            self.run.write_result(RunResult.from_dict(result))
        self.run.update(**VmState.entries(placement={e.host: e.ranks for e in ends}))
        kind, why = verdict(ends, cancelled=self.cancelled.is_set(), result=result, hang=self.hang)
        if self.hang is not None:
            self.record_hang(self.hang)
        if kind in ("cancelled", "completed"):
            self.run.update(state=kind)
            return END
        if kind == "stopped":
            self.run.update(state="stopped", stop_reason=why)
            return END
        if kind == "preemptions" and self.notice_at is not None:  # every node has exited: rank 0 flushed its upload
            self.run.update(**VmState.entries(notice_to_saved_s=round(time.monotonic() - self.notice_at, 2)))
        if kind in KINDS:
            return self.restart(kind, why)
        return RELAUNCH if self.count(kind, why) else END

    def restart(self, kind: str, why: str) -> str:
        """A hang or a crash: start every node again in place within its budget; past it, stop. A crash with no
        budget asked for (max_crash_restarts: 0) is a failure, relaunched as it always was."""
        again, line = restart_or_stop(self.run, self.recipe.resilient, kind, why, self.note)
        if again:
            log.info("%s", line)
            return RESTART
        if line is not None:
            log.info("%s", line)
            self.run.update(state="failed")
            return END
        return RELAUNCH if self.count("failures", why) else END

    def record_hang(self, hang: Hang) -> None:
        """Every node's dump of its ranks, into node 0's folder for this attempt (node 0's own agent wrote its
        ranks' files there already), and the hang's line in `launcher logs`."""
        dest = self.run.stacks_dir(self.attempt)
        save_stacks(self.stacks, dest, replace=False)
        self.note(f"{hang.line()}; stacks of every rank in {dest.relative_to(self.run.dir)}/ on node 0 ({self.me})")

    def note(self, line: str) -> None:
        """A line for `launcher logs`, written once the attempt's notes are all known (forward_notes)."""
        self.notes.append(note_line(line))

    async def forward_notes(self, ends: list[NodeEnd]) -> None:
        """The notes go into rank 0's log on the host that ran rank 0: `launcher logs` reads the copy written
        last (by the second), so a copy on node 0 beside it could hide the rank's own lines. Node 0 keeps them
        where that host cannot be reached."""
        text, self.notes = "".join(self.notes), []
        host = next((e.host for e in ends if 0 in e.ranks), self.me)
        if text and host != self.me:
            log_file = f"{layout.host_run_dir(self.cfg, host, self.run.name)}/{rank_log(0)}"
            try:
                done = await run_remote(host_specs(self.cfg, [host])[0], f"cat >> {shlex.quote(log_file)}",
                                        input=text, timeout=30)
                text = "" if done.ok else text
            except (UsageError, OSError) as err:
                log.info("could not add the notes to %s's rank 0 log: %s", host, err)
        if text:
            self.run.append_log(text)

    def count(self, kind: str, why: str) -> bool:
        counts = dict(self.run.info().requeues)
        limit = {"preemptions": self.cfg.max_preemptions, "failures": self.cfg.max_failures}[kind]
        if counts.get(kind, 0) >= limit:
            self.stop(f"not relaunched: {kind} limit of {limit} reached (vms.max_{kind}); last: {why}")
            return False
        counts[kind] = counts.get(kind, 0) + 1
        log.info("relaunching (%s %d/%d): %s", kind, counts[kind], limit, why)
        self.run.update(requeues=counts, state="requeued", last_requeue=why)
        return True

    def stop(self, why: str, state: str = "stopped") -> None:
        log.info("%s", why)
        self.run.update(state=state, stop_reason=why)


def _order(proc: Any, what: str) -> None:
    try:
        proc.stdin.write(what + "\n")
    except Exception:  # noqa: BLE001 - the channel is closing: the agent stops on end of input anyway
        pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--self", dest="me", required=True, help="this VM's address, as listed in the hosts")
    args = parser.parse_args(argv)
    folder = Path(args.run_dir).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor: %(message)s", stream=sys.stdout)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # a line per channel otherwise
    run = Run.at(folder)
    run.update(**VmState.entries(supervisor_pid=os.getpid(), supervisor_start=_start_time()))
    try:
        asyncio.run(Supervisor(run, args.me).main())
    finally:
        run.update(remove=VmState.keys("supervisor_pid", "supervisor_start"))
        (run.dir / layout.PID_FILE).unlink(missing_ok=True)
    return 0


def _start_time() -> Optional[int]:
    from launcher.backends import process_start

    return process_start(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
