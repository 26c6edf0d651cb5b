"""VMs, on each node: the node agent that the run's supervisor (`launcher.vms.supervise`) starts over SSH.

    python -m jobs.environments.vms --run-dir DIR --nnodes N --nproc P --rdzv HOST0:PORT --rdzv-id ID --local-addr ADDR \
        [--restart K]

It starts this node's ranks with one torchrun (c10d rendezvous on node 0; `--local-addr` because every
host of a test machine would report the same hostname), watches the provider's metadata service for
a spot notice (`jobs.environments.spot`), and talks to the supervisor over the SSH channel:
- stdout: one JSON object per line, an event: `started`, `notice`, `stalled` (this node's ranks made no
  progress for the hang timeout: `jobs.watchdog.NodeWatchdog`), `progress` (they moved again after a
  `stalled`), `stacks` (this node's ranks' stacks, dumped on `hang`), `exit` (with this node's ranks and,
  where rank 0 ran here, the run's result);
- stdin: `stop` (cancel: the ranks agree on a step, save and exit), `kill` (the job is lost: another
  node died, so collectives can never finish), `hang N` (every node has stalled: dump this node's ranks'
  stacks into `run.stacks_dir(N)`, report them, then kill every process of the attempt); end of input
  means the supervisor is gone, which stops the ranks as `stop` does, so no node trains on unsupervised.

The supervisor decides the hang, not the node: a hang is no progress on any live rank of any node, and one
node's ranks may wait for another's in a long step. `--restart K` is the supervisor's K-th restart inside
the allocation (jobs.watchdog): a new start for scripts (RESTART_VAR), resuming whatever --resume said.

On a notice every rank of this node gets SIGUSR1 directly (torchrun's agent would die of it); the
trainer's stop agreement spreads it to the other nodes at the end of the step in progress (the next one
for steps under 0.25 s), they save one checkpoint together and rank 0 flushes its upload before exiting. torchrun forwards only SIGTERM, which is a
cancel to the trainer: the notice must reach the ranks as what it is.

This module imports no torch: the agent is a small process next to the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from jobs import flight_recorder, stacks
from jobs.script import catches
from jobs.schema import RecipeConfig
from jobs.schema.run_dir import LOGS, PROGRESS, RESULT_JSON, Run
from jobs.script_start import RESTART_VAR
from jobs.watchdog import Hang, NodeWatchdog, descendants

ENTRY_MODULE = "jobs.environments.vms"
STACK_CHARS = 64_000  # of each rank's stack sent to the supervisor (the whole dump stays in this node's folder)


def torchrun_command(recipe: RecipeConfig, args: argparse.Namespace) -> list[str]:
    """One torchrun per node; the rendezvous id is per launch, so a relaunch never meets the last one's state.
    A run on one VM (one node, a sweep's trial, a run resumed on the one VM that came back) meets nobody: its
    rendezvous is a free local port (torchrun --standalone), never vms.rdzv_port, which another run on the
    same VM may hold (its store listens on every address)."""
    entry = ["-m", "jobs.script" if recipe.script else "jobs.train", "--run-dir", args.run_dir]
    meet = ["--standalone"] if args.nnodes == 1 else [
        "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv}", f"--rdzv-id={args.rdzv_id}",
        f"--local-addr={args.local_addr}"]
    return [sys.executable, "-m", "jobs.torchrun", f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc}",
            *meet, "--max-restarts=0", *entry]


class Agent:
    """One node's torchrun, the notice watcher and (under the VM supervisor) its channel."""

    def __init__(self, run_dir: Path, host: str, nproc: int) -> None:
        self.host, self.nproc = host, nproc
        self.run = Run.at(run_dir)
        self.started = time.time()
        self.child: Optional[subprocess.Popen] = None
        self.notice: Optional[dict[str, Any]] = None
        self.asked: Optional[str] = None  # "stop", "kill" or "hang", from the supervisor
        self.watchdog: Optional[NodeWatchdog] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ channel
    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:  # the watcher thread and the main thread both write
            sys.stdout.write(json.dumps({"event": event, "host": self.host, **fields}) + "\n")
            sys.stdout.flush()

    def listen(self) -> None:
        """The supervisor's orders; end of input (its SSH session is gone) counts as `stop`."""
        for line in sys.stdin:
            order, _, arg = line.strip().partition(" ")
            if order in ("stop", "kill"):
                self.order(order)
            elif order == "hang" and arg.isdigit():
                self.end_hung(int(arg))
        self.order("stop")

    def order(self, what: str) -> None:
        if self.asked in ("kill", "hang") or (self.asked == "stop" and what == "stop"):
            return
        self.asked = what
        if what == "stop":
            self._signal_torchrun(signal.SIGTERM)  # torchrun forwards it to every rank: they save and exit
        else:
            self._kill_all()

    # ------------------------------------------------------------------ notices
    def on_notice(self, notice: Any) -> None:
        detail = {"provider": notice.provider, "kind": notice.kind, "detail": notice.detail}
        self.emit("notice", **detail)
        if notice.kind != "preemption" or self.notice is not None:
            return  # a rebalance recommendation is an early warning only
        self.notice = detail
        threading.Thread(target=self._deliver_notice, daemon=True).start()

    def _deliver_notice(self) -> None:
        """SIGUSR1 to every rank, once each, as soon as it handles it: a rank still importing torch would die
        of the signal's default action, and one that has not started yet must still learn of the notice."""
        told: set[int] = set()
        while (self.child is None or self.child.poll() is None) and len(told) < self.nproc:
            for pid in self._ranks():
                if pid not in told and catches(pid, "SIGUSR1"):
                    _send(pid, signal.SIGUSR1)
                    told.add(pid)
            time.sleep(0.2)

    def watch(self, provider: str, url: Optional[str], poll_s: float) -> Any:
        """Start watching `provider`'s metadata service (none: nothing to watch); the watcher, to stop."""
        if provider == "none":
            return None
        from jobs.environments.spot import NoticeWatcher

        return NoticeWatcher(provider, url.replace("{host}", self.host) if url else None, poll_s,
                             self.on_notice, on_error=self.run.note).start()  # in rank 0's log: `launcher logs`

    # ------------------------------------------------------------------ hangs
    def watch_hangs(self, setting: Optional[float], poll_s: float = 1.0) -> None:
        """Report when this node's ranks stall for the timeout (`stalled`) and when they move again
        (`progress`); the supervisor decides from every node's reports. Ends once the supervisor gave an order
        or a spot notice came: ranks that save are expected to be quiet."""
        assert self.child is not None
        self.watchdog = NodeWatchdog(self.run, setting, self.child.pid)
        stalled = False
        while self.child.poll() is None and self.asked is None and self.notice is None:
            hang = self.watchdog.check()
            if hang is not None and not stalled:
                self.emit("stalled", **hang_fields(hang))
            elif hang is None and stalled:
                self.emit("progress")
            stalled = hang is not None
            time.sleep(poll_s)

    def end_hung(self, attempt: int) -> None:
        """The supervisor found every node stalled: this node's ranks' stacks first, then every process killed
        (a hung rank never acts on a polite SIGTERM, and the others wait on it)."""
        if self.asked in ("kill", "hang"):
            return
        self.asked = "hang"
        dest = self.run.stacks_dir(attempt)
        pids = self.watchdog.pids() if self.watchdog is not None else {}
        with flight_recorder.recording(self.run.dir, dest):  # each rank's last collectives beside its stack
            texts = stacks.dump(pids, dest)
        self.emit("stacks", attempt=attempt, dir=str(dest), stacks={str(r): t[-STACK_CHARS:] for r, t in texts.items()})
        self._kill_all()

    # ------------------------------------------------------------------ processes
    def _ranks(self) -> list[int]:
        """The rank processes: torchrun's children (it starts each in a session of its own)."""
        child = self.child
        if child is None or child.poll() is not None:
            return []
        try:
            tasks = Path(f"/proc/{child.pid}/task").iterdir()
            return [int(p) for t in tasks for p in (t / "children").read_text().split()]
        except OSError:
            return []

    def _signal_torchrun(self, sig: signal.Signals) -> None:
        if self.child is not None and self.child.poll() is None:
            _send(self.child.pid, sig)

    def _kill_all(self) -> None:
        """Every process below torchrun (a script's own process is below its rank's wrapper), then torchrun."""
        if self.child is not None and self.child.poll() is None:
            for pid in descendants(self.child.pid):
                _send(pid, signal.SIGKILL)
        self._signal_torchrun(signal.SIGKILL)

    def start(self, command: list[str], env: dict[str, str], log: Optional[Path] = None) -> None:
        """torchrun in a session of its own (only this agent signals it); its output to `log` or ours."""
        out = open(log, "ab") if log is not None else None
        self.child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT if out else None, start_new_session=True)
        if out is not None:
            out.close()
        if self.asked == "stop":  # the stop came while torchrun was starting
            self._signal_torchrun(signal.SIGTERM)
        self.emit("started", pid=self.child.pid)

    def run_to_end(self, watcher: Any) -> int:
        """Wait for torchrun, stop the watcher, report; torchrun's exit code."""
        assert self.child is not None
        code = self.child.wait()
        if watcher is not None:
            watcher.stop()
        self.report(code)
        return code

    def report(self, code: int) -> None:
        """This node's ranks (their logs written during this launch) and, where rank 0 ran here, the result."""
        ranks = sorted(int(p.stem[4:]) for p in (self.run.dir / LOGS).glob("rank*.log")
                       if p.stem[4:].isdigit() and p.stat().st_mtime >= self.started)
        result_file = self.run.dir / RESULT_JSON
        result = None
        if 0 in ranks and result_file.exists() and result_file.stat().st_mtime >= self.started:
            result = self.run.result().to_dict()
        self.emit("exit", code=code, ranks=ranks, result=result, notice=self.notice, asked=self.asked)


def hang_fields(hang: Hang) -> dict[str, Any]:
    """A Hang as a `stalled` event's fields (JSON: the steps' ranks as strings)."""
    return {"ranks": list(hang.ranks), "stalled_s": round(hang.stalled_s, 1), "timeout_s": hang.timeout_s,
            "steps": {str(r): s for r, s in hang.steps.items()}}


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--run-dir", "--rdzv", "--rdzv-id", "--local-addr"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--restart", type=int, default=0, help="restarts inside the allocation before this one")
    args = parser.parse_args(argv)
    args.run_dir = str(Path(args.run_dir).resolve())
    agent = Agent(Path(args.run_dir), args.local_addr, args.nproc)
    stop_on_signals(agent)
    recipe, cluster = agent.run.recipe(), agent.run.cluster()
    cfg = cluster.vms
    assert cfg is not None, "a vms run's cluster.yaml has a vms: section"
    env = {**os.environ, **cfg.env, RESTART_VAR: str(args.restart)}  # secret values too: never on a command line
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.restart:  # a restart continues the run whatever --resume said (this host's run.json is its own)
        agent.run.update(resume="auto")
    (agent.run.dir / LOGS).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(agent.run.dir / PROGRESS, ignore_errors=True)  # the previous attempt's reports
    agent.start(torchrun_command(recipe, args), env, agent.run.dir / LOGS / f"node-{args.local_addr}.log")
    watcher = agent.watch(cfg.provider, cfg.metadata_url, cfg.notice_poll_s)
    threading.Thread(target=agent.listen, daemon=True).start()
    threading.Thread(target=agent.watch_hangs, args=(recipe.resilient.hang_timeout_s,), daemon=True).start()
    return 0 if agent.run_to_end(watcher) == 0 else 1


def stop_on_signals(agent: Agent) -> None:
    """SIGTERM or SIGHUP to the agent (sshd closing the session, SkyPilot cancelling, a person) is a stop."""
    signal.signal(signal.SIGTERM, lambda *_: agent.order("stop"))
    signal.signal(signal.SIGHUP, lambda *_: agent.order("stop"))


if __name__ == "__main__":
    sys.exit(main())
