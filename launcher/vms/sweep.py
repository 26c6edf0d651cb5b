"""A Bayesian sweep on a pool of VMs: where its study lives, where its workers run, how it is followed.

The study lives in the object store (`<checkpoint.uri>/sweeps/<sweep>/study/`, `jobs.study_store`): VMs share no
file system, the trials' rank 0s report their evaluations from their own VMs, and no machine holds the only
copy, so the study survives the loss of any VM and of the machine that started the sweep. The workers run on
node 0 of the pool (the first host), detached, as a run's supervisor does: `launcher sweep` returns once they
run, and this machine may go away. Worker i owns slot i of the pool (the hosts from i x parallel.nodes on, of
`vms.hosts` or what `vms.hosts_command` prints at each relaunch): its cluster config (`cluster-<i>.yaml` in the
sweep's folder on node 0) says so with `vms.host_offset`, and puts the trials' supervisors on node 0 beside the
worker (`vms.supervisor_host`). Each trial it claims is then an ordinary VM run: a spot notice on its VM makes the
ranks save, the supervisor waits for the VM (or its replacement) and relaunches, and the trial resumes from its
checkpoint in the object store, as the same trial. If node 0 itself is lost, the same `launcher sweep` command
starts the workers again on the pool's new first host: each claims its unfinished trial first, which resumes from
its checkpoints (its run id is the same: `Sweep.run_id`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from launcher.backends.base import Launched
from launcher.runs import code_dir_of
from launcher.shell import shell_path
from launcher.vms import layout
from launcher.vms.checks import REMOTE_SCHEMES
from launcher.vms.hosts import hosts_from_command
from launcher.vms.ssh import HostError, HostSpec, connect, host_specs, run as run_remote, sync_tree_async
from launcher.vms.sync import code_to_copy
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.errors import UsageError, short
from jobs.schema.files import REPO_ROOT, to_yaml
from jobs.schema.secrets import write_private
from jobs.schema.study import study_uri as store_uri
from jobs.schema.vms import VmsConfig

WORKERS_JSON = "workers-{attempt}.json"  # in the sweep's folder here: node 0, its folder there, the workers' pids


def check_workers(recipe: RecipeConfig, cluster: ClusterConfig, workers: int) -> None:
    """The study and every trial's checkpoints go to the object store; a listed pool has a slot per worker."""
    uri = recipe.checkpoint.uri
    if not uri or not uri.startswith(REMOTE_SCHEMES):
        given = f"checkpoint.uri={short(uri)}" if uri else "no checkpoint.uri"
        raise UsageError(f"cluster config {cluster.name}: a sweep on VMs keeps its study and its trials' checkpoints "
                         f"in an object store (VMs share no file system), and this one has {given}; nothing was "
                         "created or started", hint="set checkpoint.uri=s3://BUCKET/PREFIX (or gs://...)")
    cfg = _cfg(cluster)
    if cfg.hosts:  # a hosts_command is run at launch (launch_workers says the same there)
        _refuse_small_pool(cluster, len(cfg.hosts), workers, recipe.parallel.nodes)


def _refuse_small_pool(cluster: ClusterConfig, hosts: int, workers: int, nodes: int) -> None:
    if hosts < workers * nodes:
        key = "vms.hosts lists" if _cfg(cluster).hosts else "vms.hosts_command printed"
        raise UsageError(f"cluster config {cluster.name}: --workers {workers} of parallel.nodes={nodes} need "
                         f"{workers * nodes} VMs (one slot of {nodes} per worker) and {key} {hosts}; nothing was "
                         "created or started", hint=f"use --workers {max(1, hosts // nodes)}, or add VMs")


def study_uri(recipe: RecipeConfig, cluster: ClusterConfig, name: str) -> Optional[str]:
    assert recipe.checkpoint.uri, "check_workers refused a sweep without checkpoint.uri"
    return store_uri(recipe.checkpoint.uri, name)


def _cfg(cluster: ClusterConfig) -> VmsConfig:
    assert cluster.vms is not None, "ClusterConfig.check() requires a vms: section for backend vms"
    return cluster.vms


def slot_cluster(cluster: ClusterConfig, offset: int, head: str, runs_dir: str) -> ClusterConfig:
    """A worker's cluster config on node 0: its slot of the pool (the hosts from `offset` on, found again at every
    relaunch, so a replaced VM is found under its new address), the trials' supervisors on node 0 beside the
    worker, and the key and known_hosts that the launch copied to node 0 (`launcher.backends.vms.send_ssh_files`)."""
    cfg = _cfg(cluster)
    ssh = f"{layout.host_root(cfg, head)}/ssh"
    changes: dict[str, object] = {"host_offset": offset, "supervisor_host": head}
    if cfg.identity_file:
        changes["identity_file"] = f"{ssh}/identity"
    if cfg.known_hosts != "ignore":
        changes["known_hosts"] = f"{ssh}/known_hosts"
    return dataclasses.replace(cluster, vms=dataclasses.replace(cfg, **changes), runs_dir=runs_dir)


def launch_workers(recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, name: str, attempt: int,
                   workers: int, work_here: Callable[[int], int]) -> Launched:
    """Copy the code and the sweep's files to node 0 and start `workers` workers there, detached."""
    from launcher.backends.vms import send_ssh_files

    cfg, nodes = _cfg(cluster), recipe.parallel.nodes
    pool = list(cfg.hosts) or hosts_from_command(cfg.hosts_command or "", f"cluster config {cluster.name}")
    _refuse_small_pool(cluster, len(pool), workers, nodes)
    head = host_specs(cfg, pool[:1])[0]
    remote = layout.sweep_folder(cfg, head.address, name)
    code = code_to_copy(cfg, str(code_dir_of(recipe)), folder.parents[1], f"cluster config {cluster.name}") \
        if cfg.code == "sync" else []

    async def start() -> list[int]:
        async with await connect(head) as conn:
            if code:
                await sync_tree_async(conn, code, layout.host_code_dir(cfg, head.address))
            with tempfile.TemporaryDirectory() as staging:
                files = _stage(Path(staging), recipe, cluster, folder, pool, head.address, workers)
                await sync_tree_async(conn, files, remote)
                await send_ssh_files(conn, cfg, head.address, pool, Path(staging))
            done = await run_remote(conn, layout.workers_command(cfg, head.address, remote, workers), timeout=60)
        pids = [int(line) for line in done.stdout.split() if line.isdigit()]
        if not done.ok or len(pids) != workers:
            raise HostError(f"{head.login}: could not start the sweep's workers: {done.last_error_line()}",
                            hint=f"check vms.python ({cfg.interpreter}) and vms.setup on that VM")
        return pids

    pids = asyncio.run(start())
    record = folder / WORKERS_JSON.format(attempt=attempt)
    record.write_text(json.dumps({"head": dataclasses.asdict(head), "folder": remote, "pids": pids}, indent=2) + "\n")
    slots = ", ".join(f"worker {i}: {' '.join(pool[i * nodes:(i + 1) * nodes])}" for i in range(workers))
    print(f"sweep {name}: {workers} worker{'s' if workers > 1 else ''} started on {head.address} (pids "
          f"{', '.join(map(str, pids))}; {slots}); they go on without this machine", flush=True)
    return Launched(0, ended=False, batch_id=str(record))


def _stage(staging: Path, recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, pool: list[str], head: str,
           workers: int) -> list[tuple[Path, str]]:
    """worker.json as node 0 reads it, a cluster config per worker, and vms.env as worker.env (all 0600)."""
    cfg, nodes = _cfg(cluster), recipe.parallel.nodes
    runs_dir = f"{layout.host_root(cfg, head)}/{layout.SWEEP_RUNS}"
    given = json.loads((folder / "worker.json").read_text())
    cwd = layout.host_project_dir(cfg, head)
    if not Path.cwd().is_relative_to(REPO_ROOT) and cfg.code == "sync":  # the user's code folder, as synced
        cwd = f"{layout.host_code_dir(cfg, head)}/user"
    given.update(cwd=cwd, cluster="(each worker's own: --cluster)")  # "~" is expanded there (load_sweep)
    out = []
    for name, text in [("worker.json", json.dumps(given, indent=2) + "\n"),
                       ("worker.env", "".join(f"{k}={shlex.quote(v)}\n" for k, v in cfg.env.items())),
                       *[(f"cluster-{i}.yaml", to_yaml(slot_cluster(cluster, i * nodes, head, runs_dir)))
                         for i in range(workers)]]:
        write_private(staging / name, text)
        out.append((staging / name, name))
    return out


def _alive(batch_id: str) -> tuple[list[int], dict[str, object]]:
    """The workers of `batch_id` still running on node 0 (their pids), and the batch's record."""
    data = json.loads(Path(batch_id).read_text())
    head = HostSpec(**data["head"])
    pids = " ".join(str(int(p)) for p in data["pids"])
    command = f"for p in {pids}; do grep -qs {layout.WORKER_MODULE} /proc/$p/cmdline && echo $p; done; true"
    done = asyncio.run(run_remote(head, command, timeout=60))
    if not done.ok:
        raise HostError(f"{head.login}: cannot ask after the sweep's workers: {done.last_error_line()}")
    return [int(p) for p in done.stdout.split() if p.isdigit()], data


def workers_live(batch_id: str) -> bool:
    try:
        return bool(_alive(batch_id)[0])
    except (OSError, ValueError, UsageError):  # no record here, or node 0 gone: nothing of this batch runs
        return False


def wait_workers(batch_id: str, poll_s: float = 2.0) -> int:
    """Until every worker on node 0 has ended; 0 if each exited 0 (a worker stopped by a signal exits 1)."""
    while True:
        alive, data = _alive(batch_id)
        if not alive:
            break
        time.sleep(poll_s)
    head = HostSpec(**data["head"])  # type: ignore[arg-type]
    done = asyncio.run(run_remote(head, f"cat {shell_path(str(data['folder']))}/worker-*.code", timeout=60))
    codes = [int(c) for c in done.stdout.split() if c.isdigit()]
    return 0 if done.ok and codes and not any(codes) else 1
