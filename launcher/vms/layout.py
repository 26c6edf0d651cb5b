"""Where a VM run's files live on each host, and the command lines that start things there.

    <remote_dir>/                     vms.remote_dir, "{host}" replaced by the host's address
        code/launcher/                the project (launcher, jobs, recipes, cluster configs)
        code/user/                    the user's code_dir, when it is not the project itself
        runs/<run>/                   this host's own run directory: config, logs of its ranks, checkpoints
        ssh/identity, ssh/known_hosts node 0 only: what its supervisor reaches the other hosts with

Every host has its own copy of the run directory: VMs share no file system. Node 0's copy is the
run's record (run.json, result.json), kept by the supervisor.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from jobs.schema.files import REPO_ROOT
from jobs.schema.run_dir import CLUSTER_YAML, CONFIG_YAML, RUN_JSON, Run
from jobs.schema.secrets import SECRETS_FILE
from jobs.environments.vms import ENTRY_MODULE as AGENT_MODULE
from launcher.shell import shell_path
from launcher.vms.state import VmState
from launcher.vms.sync import select
from jobs.schema.vms import HOST_FIELD, VmsConfig

SWEEP_RUNS = "sweep-runs"  # in node 0's remote_dir: the runs directory of a sweep's workers
WORKER_MODULE = "launcher.sweeps.worker"
PID_FILE = "supervisor.pid"  # in node 0's run directory: the supervisor's pid from the moment it is started


def host_root(cfg: VmsConfig, host: str) -> str:
    return cfg.remote_dir.replace(HOST_FIELD, host).rstrip("/")


def host_code_dir(cfg: VmsConfig, host: str) -> str:
    return cfg.code_path if cfg.code == "image" and cfg.code_path else f"{host_root(cfg, host)}/code"


def host_project_dir(cfg: VmsConfig, host: str) -> str:
    return cfg.code_path if cfg.code == "image" and cfg.code_path else f"{host_code_dir(cfg, host)}/launcher"


def host_run_dir(cfg: VmsConfig, host: str, run_name: str) -> str:
    return f"{host_root(cfg, host)}/runs/{run_name}"


# ------------------------------------------------------------------ files to copy
def code_files(run: Run) -> list[tuple[Path, str]]:
    """What node 0 copies to another host: its whole code folder (project and user code, as `launch` chose it)."""
    code = Path(run.dir).parents[1] / "code"
    return select(code, ".") if code.is_dir() else []


def host_info(run: Run, cfg: VmsConfig, host: str) -> dict:
    """run.json as a host's ranks read it: the user's code at that host's copy."""
    info = run.readable_info().to_dict()
    for key in VmState.keys("supervisor_pid", "supervisor_start"):  # node 0's record of its supervisor: not copied
        info.pop(key, None)
    if info.get("code_dir"):
        local = Path(info["code_dir"])
        synced_user = (Path(run.dir).parents[1] / "code" / "user").is_dir() or not local.is_relative_to(REPO_ROOT)
        info["code_dir"] = f"{host_code_dir(cfg, host)}/user" if synced_user and cfg.code == "sync" \
            else host_project_dir(cfg, host)
    return info


def run_files(run: Run, cfg: VmsConfig, host: str, staging: Path) -> list[tuple[Path, str]]:
    """The files a host's run directory starts with (secrets.yaml keeps its 0600); its run.json is written
    into `staging` (a temporary folder) first."""
    out = [(run.dir / name, name) for name in (CONFIG_YAML, CLUSTER_YAML, SECRETS_FILE) if (run.dir / name).exists()]
    staged = staging / RUN_JSON
    staged.write_text(json.dumps(host_info(run, cfg, host), indent=2) + "\n")
    return out + [(staged, RUN_JSON)]


# ------------------------------------------------------------------ commands
def setup_script(cfg: VmsConfig, *then: str) -> str:
    """vms.setup's lines, each on a line of its own (a "# comment" or a trailing ";" ends only its line), each
    checked: a failing one stops the script with its exit status, naming it; then the lines `then`. The pre-launch
    probe, the supervisor and every node agent run their setup through this one function."""
    lines: list[str] = []
    for n, line in enumerate(cfg.setup, 1):
        lines += [line, f'launcher_status=$?; if [ "$launcher_status" -ne 0 ]; then echo "vms.setup line {n} '
                  f'failed (exit status $launcher_status)" >&2; exit "$launcher_status"; fi']
    return "\n".join([*lines, *then])


def _in_project(cfg: VmsConfig, host: str, *then: str) -> str:
    project = shell_path(host_project_dir(cfg, host))
    return "\n".join([f"cd {project} || exit 1", f'export PYTHONPATH={project}"${{PYTHONPATH:+:$PYTHONPATH}}"',
                      setup_script(cfg, *then)])


def agent_command(cfg: VmsConfig, run_name: str, host: str, nnodes: int, nproc: int, rdzv: str, rdzv_id: str,
                  restarts: int = 0) -> str:
    """The shell script that starts a node agent on `host` (setup lines first, as the user wrote them);
    `restarts`: the restarts in place before this start (jobs.watchdog)."""
    agent = [cfg.interpreter, "-u", "-m", AGENT_MODULE, "--nnodes", str(nnodes), "--nproc", str(nproc),
             "--rdzv", rdzv, "--rdzv-id", rdzv_id, "--local-addr", host, "--restart", str(restarts)]
    return _in_project(cfg, host, f"exec {' '.join(map(shlex.quote, agent))} --run-dir "
                       f"{shell_path(host_run_dir(cfg, host, run_name))}")


def supervisor_command(cfg: VmsConfig, run_name: str, host: str) -> str:
    """Start the supervisor on node 0 in a session of its own (it outlives this SSH session); prints its pid."""
    run_dir = shell_path(host_run_dir(cfg, host, run_name))
    start = [cfg.interpreter, "-u", "-m", "launcher.vms.supervise", "--self", host]
    return _in_project(cfg, host, f"mkdir -p {run_dir}/logs || exit 1",
                       f"(setsid {' '.join(map(shlex.quote, start))} --run-dir {run_dir} "
                       f">> {run_dir}/logs/supervisor.log 2>&1 < /dev/null & echo $! > {run_dir}/{PID_FILE}; "
                       f"cat {run_dir}/{PID_FILE})")


def sweep_folder(cfg: VmsConfig, host: str, sweep: str) -> str:
    """A sweep's folder on node 0, in the workers' runs directory (beside `runs/`, which the trials' supervisors
    use: a worker's record of a trial and the trial's own run directory are two folders even on one host)."""
    return f"{host_root(cfg, host)}/{SWEEP_RUNS}/sweeps/{sweep}"


def workers_command(cfg: VmsConfig, host: str, folder: str, workers: int) -> str:
    """Start a sweep's workers on node 0, each in a session of its own (they outlive this SSH session), with
    vms.env from the sweep folder's worker.env (never on a command line); prints their pids. Each worker's
    exit status goes into worker-<i>.code when it ends."""
    d = shell_path(folder)
    starts = []
    for i in range(workers):
        worker = [cfg.interpreter, "-u", "-m", WORKER_MODULE, "--worker", str(i)]
        inner = (f"{' '.join(map(shlex.quote, worker))} --sweep-dir {d} --cluster {d}/cluster-{i}.yaml "
                 f">> {d}/worker-{i}.log 2>&1; echo $? > {d}/worker-{i}.code")
        starts.append(f"(rm -f {d}/worker-{i}.code; setsid sh -c {shlex.quote(inner)} < /dev/null > /dev/null 2>&1 & "
                      "echo $!)")
    return _in_project(cfg, host, f"set -a; . {d}/worker.env || exit 1; set +a", *starts)


def supervisor_view(cfg: VmsConfig, run_dir: Path) -> VmsConfig:
    """vms: as node 0's supervisor uses it: the key and known_hosts copied there by the launch."""
    ssh = run_dir.parents[1] / "ssh"
    changes = {}
    if (ssh / "identity").exists():
        changes["identity_file"] = str(ssh / "identity")
    if cfg.known_hosts != "ignore" and (ssh / "known_hosts").exists():
        changes["known_hosts"] = str(ssh / "known_hosts")
    return dataclasses.replace(cfg, **changes)
