"""VM backend: a group of VMs reached over SSH (GCP, AWS, or any machines with sshd).

`launch` checks every host (`launcher.vms.checks`), copies the code and the run's files to node 0, and
starts the run's supervisor there, detached (`launcher.vms.supervise`): it starts one torchrun per
node, follows spot notices and relaunches, so this machine may disconnect once `launch` returns.
`status`, `logs`, `cancel` and `wait` reach node 0 over SSH from any later shell of this machine, through
the run directory here (its run.json names node 0 and its folder there).

Each host keeps its own run directory (`launcher.vms.layout`); when the run has ended, `status` copies
node 0's result.json here, so `launcher status` and `launch --wait` report it as for other backends.
"""
from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from launcher.backends.base import LIVE_STATES, Batch, Launched, Planned
from launcher.checks import Check
from launcher.runs import code_dir_of
from launcher.shell import shell_path
from launcher.vms import layout
from launcher.vms.checks import check_hosts, check_recipe_on_vms, doctor_checks
from launcher.vms.hosts import resolve_hosts
from launcher.vms.sync import code_to_copy, known_hosts_for
from launcher.vms.remote_output import LOG_MARK, json_object, last_json_object, marked_log
from launcher.vms.ssh import HostError, HostSpec, connect, host_specs, run as run_remote, sync_tree_async
from launcher.vms.state import VmState
from launcher.vms.sweep import (  # noqa: F401 - a Bayesian sweep's part of this backend (SweepWorkers)
    check_workers, launch_workers, study_uri, wait_workers, workers_live)
from jobs.watchdog import status_fields
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.stacks import read_answers
from jobs.schema.errors import UsageError
from jobs.schema.run_dir import LOGS, STACKS, Run, RunInfo, RunResult
from jobs.schema.vms import VmsConfig

RESTARTS_RUNS = True  # the run's supervisor relaunches the ranks after a spot preemption (and restarts them in place
# after a hang or a crash: launcher.vms.supervise)

SSH_DIR_MODE = 0o700


def _cfg(cluster: ClusterConfig) -> VmsConfig:
    assert cluster.vms is not None, "ClusterConfig.check() requires a vms: section for backend vms"
    return cluster.vms


def _src(cluster: ClusterConfig) -> str:
    return f"cluster config {cluster.name}"


# ----------------------------------------------------------------------------- checks
def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    """The recipe fits VMs, the code to copy is not too big, every host answers and has a usable Python and
    torch: before anything is written."""
    cfg = _cfg(cluster)
    check_recipe_on_vms(recipe, cluster, _src(cluster))
    if cfg.code == "sync":
        runs = Path(cluster.runs_dir).expanduser().resolve() if cluster.runs_dir else None
        code_to_copy(cfg, str(code_dir_of(recipe)), runs, _src(cluster))
    hosts = resolve_hosts(cfg, _src(cluster), recipe.parallel.nodes)
    supervisor = [cfg.supervisor_host] if cfg.supervisor_host and cfg.supervisor_host not in hosts else []
    check_hosts(cfg, hosts + supervisor, _src(cluster))


def check_many(named: Sequence[tuple[str, RecipeConfig]], cluster: ClusterConfig) -> None:
    """Grid and random sweeps on VMs are not built: refused before anything is written. A Bayesian sweep runs
    (`launcher.vms.sweep`): its workers draw trials from a study in the object store."""
    raise UsageError(f"cluster config {cluster.name}: grid and random sweeps do not run on VMs ({len(named)} "
                     "trials); a Bayesian sweep does, its study in the object store", hint="use --search bayes "
                     "--param KEY=DIST:ARGS --trials N --workers K, or run this sweep locally or on Slurm")


# ----------------------------------------------------------------------------- launching
def launch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """Copy code and run files to node 0 and start the supervisor there; 0 once it runs (`wait` follows it)."""
    cfg = _cfg(cluster)
    hosts = resolve_hosts(cfg, _src(cluster), recipe.parallel.nodes)
    head = host_specs(cfg, [cfg.supervisor_host or hosts[0]])[0]  # where the supervisor runs: node 0 by default
    try:
        code = code_to_copy(cfg, run.info().code_dir, run.dir.parent, _src(cluster)) if cfg.code == "sync" else []
        pid = asyncio.run(_start(cfg, head, run, code, hosts))
    except UsageError:
        if run.info().launches == 1 and VmState.of(run.info()).head is None:
            shutil.rmtree(run.dir, ignore_errors=True)  # never started: nothing stays behind
        raise
    run.update(state="submitted", **VmState(head=head.address, run_dir=layout.host_run_dir(cfg, head.address, run.name),
                                            hosts=tuple(hosts), started_pid=pid).to_dict())
    print(f"run {run.name}: supervisor (pid {pid}) started on {head.address}; nodes {', '.join(hosts)} "
          f"(follow it: launcher status {run.name}, launcher logs {run.name})", flush=True)
    return 0


async def _start(cfg: VmsConfig, head: HostSpec, run: Run, code: list[tuple[Path, str]], hosts: list[str]) -> int:
    async with await connect(head) as conn:
        await _refuse_foreign(conn, cfg, head, run)
        if code:
            await sync_tree_async(conn, code, layout.host_code_dir(cfg, head.address))
        with tempfile.TemporaryDirectory() as staging:
            await sync_tree_async(conn, layout.run_files(run, cfg, head.address, Path(staging)),
                                  layout.host_run_dir(cfg, head.address, run.name))
            await send_ssh_files(conn, cfg, head.address, hosts, Path(staging))
        done = await run_remote(conn, layout.supervisor_command(cfg, run.name, head.address), timeout=60)
    pid = done.stdout.strip().splitlines()[-1] if done.ok and done.stdout.strip() else ""
    if not pid.isdigit():
        raise HostError(f"{head.login}: could not start the run's supervisor: {done.last_error_line()}",
                        hint=f"check vms.python ({cfg.interpreter}) and vms.setup on that VM")
    return int(pid)


async def _refuse_foreign(conn: Any, cfg: VmsConfig, head: HostSpec, run: Run) -> None:
    """Node 0's folder for this run name must be this run's (or new): another run's checkpoints there would
    be resumed as this run's (a run directory made on another machine, or in another runs directory)."""
    folder = layout.host_run_dir(cfg, head.address, run.name)
    done = await run_remote(conn, f"cat {shell_path(folder)}/run.json 2>/dev/null", timeout=30)
    try:
        theirs = json_object(head.address, "run.json", done.stdout).get("run_id") if done.ok else None
    except HostError:
        theirs = None  # no run.json there, or a damaged one: nothing to resume from
    if isinstance(theirs, str) and theirs and theirs != run.info().run_id:
        raise UsageError(f"{head.address}:{folder} holds another run named {run.name} (run id {theirs}, this one "
                         f"is {run.info().run_id})", hint="choose another --run-name, continue that run with "
                         f"--run-id {theirs}, or delete that folder on the VMs")


async def send_ssh_files(conn: Any, cfg: VmsConfig, head: str, hosts: Sequence[str], staging: Path) -> None:
    """What node 0's supervisor reaches the hosts with (its own included: it starts node 0's agent over SSH too):
    the private key, and the known_hosts lines of the run's hosts only (not the user's whole list), each 0600 in
    a folder of mode 0700."""
    files = []
    if cfg.identity_file:
        files.append((Path(cfg.identity_file).expanduser(), "identity"))
    known = Path(cfg.known_hosts or "~/.ssh/known_hosts").expanduser()
    if cfg.known_hosts != "ignore" and known.is_file():
        try:
            text = known.read_text(errors="replace")
        except OSError as err:
            raise HostError(f"cannot read known_hosts file {known}: {err.strerror}",
                            hint="make it readable, or set vms.known_hosts") from None
        lines = known_hosts_for(text, hosts, cfg.port, bool(cfg.hosts_command))
        staged = staging / "known_hosts"
        staged.touch(mode=0o600)
        staged.write_text(lines)
        files.append((staged, "known_hosts"))
    await sync_tree_async(conn, files, f"{layout.host_root(cfg, head)}/ssh", folder_mode=SSH_DIR_MODE)


def launch_many(planned: Sequence[Planned], cluster: ClusterConfig, batch: Batch) -> Launched:
    """Never called: `check_many` refuses grid and random sweeps on VMs."""
    raise UsageError(f"sweep {batch.name}: grid and random sweeps do not run on VMs")


def run_trial_here(recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
    """A Bayesian sweep's trial, from its worker on node 0: an ordinary VM run on the worker's slot of the pool
    (vms.host_offset), its supervisor beside the worker (vms.supervisor_host), followed to its end."""
    launch(recipe, cluster, run)
    wait([run])
    result = run.result()
    return 0 if result.outcome == "completed" else (run.info().exit_code or 1)


# ----------------------------------------------------------------------------- following
def _remote(run: Run, what: str) -> dict[str, Any]:
    """`python -m launcher.vms.remote WHAT` on node 0: its JSON answer."""
    info = run.info()
    cfg = _cfg(run.cluster())
    head = host_specs(cfg, [VmState.of(info).head])[0]
    project = shell_path(layout.host_project_dir(cfg, head.address))
    command = (f"cd {project} && PYTHONPATH={project} {shlex.quote(cfg.interpreter)} -m launcher.vms.remote {what} "
               f"--run-dir {shell_path(VmState.of(info).run_dir)}")
    done = asyncio.run(run_remote(head, command, timeout=60))
    if not done.ok:
        raise HostError(f"{head.login}: {what} of run {run.name} failed: {done.last_error_line()}")
    return last_json_object(head.login, f"{what} of run {run.name}", done.stdout)


def environment_checks(cluster: ClusterConfig) -> list[Check]:
    """`launcher doctor`: each VM reachable over SSH with the configured user and key."""
    return doctor_checks(cluster)


def status(run: Run) -> dict[str, Any]:
    vm = VmState.of(run.info())
    out: dict[str, Any] = {"run": run.name, "backend": "vms", "dir": str(run.dir)}
    if vm.head is None:
        return {**out, "state": "unknown"}
    try:
        remote = _remote(run, "status")
    except UsageError as err:
        return {**out, "state": "unreachable", "note": str(err)}
    there = remote.get("info") if isinstance(remote.get("info"), dict) else {}
    alive = remote.get("supervisor") is not None
    state = there.get("state") or ("submitted" if alive else "unknown")  # the supervisor is starting
    if not alive and state in LIVE_STATES:
        state = "lost"  # the supervisor died (node 0 preempted or rebooted): launch again to resume
    answer = remote.get("result") if isinstance(remote.get("result"), dict) else None
    if answer and not alive:
        run.write_result(RunResult.from_dict(answer))  # the run has ended: its result here too
    result = RunResult.from_dict(answer) if answer else RunResult()
    out.update(state=state, head=vm.head, hosts=list(VmState.from_dict(there).hosts) or None,
               requeues=there.get("requeues", {}))
    for key in ("stop_reason", "last_requeue", "placement"):
        if there.get(key):
            out[key] = there[key]
    sized = VmState.from_dict(there)
    if sized.resizes:  # relaunched on the VMs that came back (vms.min_nodes), or grown back since
        out["nodes"] = f"{sized.nodes} of {run.recipe().parallel.nodes} (resized {sized.resizes}x)"
    # restarts in place by kind (the supervisor's, after a hang or a crash) and why the last one was refused
    out.update(status_fields(RunInfo.from_dict(there), alive))
    return {**out, **result.pick("step", "epoch", "outcome", "signal"), **result.metrics}


def live(run: Run) -> Optional[str]:
    state = status(run)["state"]
    head = VmState.of(run.info()).head
    return f"{state} on VMs (supervisor on {head})" if state in LIVE_STATES else None


def cancel(run: Run) -> str:
    if VmState.of(run.info()).head is None:
        return f"run {run.name} has no supervisor"
    pid = _remote(run, "cancel").get("signalled")
    if pid is None:
        return f"run {run.name} is not running"
    return f"sent SIGTERM to the supervisor of run {run.name} (pid {pid}); every node saves a checkpoint and stops"


def wait(runs: Sequence[Run], poll_s: float = 2.0) -> dict[str, str]:
    """Until every run's supervisor has ended (relaunches included); the states `status` reports. A node 0 that
    does not answer for vms.host_wait_s ends the wait with the state "unknown": the run may go on there."""
    final: dict[str, str] = {}
    unreachable_since: dict[str, float] = {}
    while len(final) < len(runs):
        for run in runs:
            if run.name not in final:
                state = status(run)["state"]
                if state == "unreachable":
                    since = unreachable_since.setdefault(run.name, time.monotonic())
                    if time.monotonic() - since >= _cfg(run.cluster()).host_wait_s:
                        final[run.name] = _gave_up(run)
                    continue
                unreachable_since.pop(run.name, None)
                if state not in LIVE_STATES:
                    final[run.name] = state
        if len(final) < len(runs):
            time.sleep(poll_s)
    return final


def _gave_up(run: Run) -> str:
    head, grace = VmState.of(run.info()).head, _cfg(run.cluster()).host_wait_s
    print(f"run {run.name}: node 0 ({head}) has not answered for {grace} s (vms.host_wait_s), so its state is "
          f"unknown: it may still run there; look again with: launcher status {run.name}", file=sys.stderr, flush=True)
    return "unknown"


def log_text(run: Run, rank: int, offset: int = 0) -> tuple[Optional[str], int]:
    """Rank `rank`'s log from byte `offset` on, from whichever host ran it last; (None, offset) if none yet."""
    info = run.info()
    cfg = _cfg(run.cluster())
    hosts = VmState.of(info).hosts
    name = f"logs/rank{rank}.log"
    # the newest copy wins: a rank may have run on another node in an earlier launch
    command_for = {h: f"cd {shell_path(layout.host_run_dir(cfg, h, run.name))} 2>/dev/null && "
                      f"mtime=$(stat -c %Y {name}) && echo \"{LOG_MARK}$mtime\" && tail -c +{offset + 1} {name}"
                   for h in hosts}

    async def fetch() -> dict[str, Any]:
        outs = await asyncio.gather(*(run_remote(s, command_for[s.address], timeout=60)
                                      for s in host_specs(cfg, hosts)), return_exceptions=True)
        return dict(zip(hosts, outs))

    answers = asyncio.run(fetch())
    found = [marked_log(h, o.stdout) for h, o in answers.items() if not isinstance(o, BaseException) and o.ok]
    found = [one for one in found if one is not None]
    if not found:
        return None, offset
    text = max(found)[1]
    return text, offset + len(text.encode())


def stacks(run: Run, dest: Path) -> dict[int, str]:
    """`python -m jobs.stacks` on every host over SSH, each in its own copy of the run's folder (its dumps stay
    there, under the same name as `dest`, which receives them here)."""
    cfg, hosts = _cfg(run.cluster()), VmState.of(run.info()).hosts

    def command(host: str) -> str:
        project, folder = shell_path(layout.host_project_dir(cfg, host)), layout.host_run_dir(cfg, host, run.name)
        return (f"cd {project} && PYTHONPATH={project} {shlex.quote(cfg.interpreter)} -m jobs.stacks --run-dir "
                f"{shell_path(folder)} --dest {shell_path(f'{folder}/{LOGS}/{STACKS}/{dest.name}')}")

    async def ask() -> list[Any]:
        return await asyncio.gather(*(run_remote(spec, command(spec.address), timeout=60)
                                      for spec in host_specs(cfg, hosts)), return_exceptions=True)

    texts: dict[int, str] = {}
    for host, done in zip(hosts, asyncio.run(ask())):
        if isinstance(done, BaseException) or not done.ok:
            why = done if isinstance(done, BaseException) else done.last_error_line()
            print(f"{host}: no stacks: {why}", file=sys.stderr)
            continue
        texts.update(read_answers(done.stdout))
    return dict(sorted(texts.items()))


def logs(run: Run, rank: int, follow: bool) -> int:
    text, offset = log_text(run, rank)
    if text is None:
        raise UsageError(f"run {run.name}: no log for rank {rank} on its VMs (yet)")
    sys.stdout.write(text)
    while follow and live(run):
        time.sleep(1.0)
        more, offset = log_text(run, rank, offset)
        sys.stdout.write(more or "")
        sys.stdout.flush()
    return 0
