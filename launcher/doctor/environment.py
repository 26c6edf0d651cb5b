"""`launcher doctor` without a run: what a launch on this cluster config needs, checked from here, each check
bounded to a few seconds. Absent GPUs are information, not a failure: a login node or a laptop has none."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.doctor.findings import Check
from jobs.schema import ClusterConfig
from jobs.schema.errors import UsageError, one_line
from jobs.schema.secrets import redact_text

CHECK_TIMEOUT_S = 8.0  # one check (a command, a store listing): a hung service must not hang the doctor
SSH_TIMEOUT_S = 5.0
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "scancel")


def check_environment(cluster: ClusterConfig, store: Optional[str]) -> list[Check]:
    from launcher import backends  # each backend names its own checks (slurm_checks, vm_checks below)

    checks = [*torch_checks(), runs_dir_check(cluster), *backends.get(cluster.backend).environment_checks(cluster)]
    return [*checks, store_check(cluster, store), tracker_check()]


def bounded(call: Callable[[], Any], seconds: float = CHECK_TIMEOUT_S) -> tuple[Any, Optional[BaseException]]:
    """call() in a daemon thread: (its value, None), (None, its exception), or (None, TimeoutError)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = call()
        except BaseException as err:  # noqa: BLE001 - reported as the check's failure
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)  # a call that never returns is left behind, not waited on
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return None, TimeoutError(f"no answer within {seconds:g} s")
    return out.get("value"), out.get("error")


def torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError as err:
        return [Check("torch", False, f"cannot import torch: {err}", "pip install torch (see pyproject.toml)")]
    found = [Check("torch", True, f"torch {torch.__version__}, Python {platform.python_version()}")]
    if not torch.cuda.is_available():
        found.append(Check("GPUs", None, "no CUDA device visible here (CPU only: ranks use gloo); NCCL: "
                           f"{'built in' if torch.distributed.is_nccl_available() else 'not available'}"))
        return found
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "not available"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    found.append(Check("GPUs", True, f"{torch.cuda.device_count()} visible ({', '.join(names)}), CUDA "
                       f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"
                       + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")))
    return found


def runs_dir_check(cluster: ClusterConfig) -> Check:
    path = Path(cluster.runs_dir).expanduser().resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        return Check("runs_dir", False, f"{existing} is not writable, so {path} cannot hold runs",
                     "set runs_dir in the cluster config (or --runs-dir) to a folder you can write")
    free = shutil.disk_usage(existing).free / 2**30
    return Check("runs_dir", True, f"{path} ({free:.1f} GiB free)")


def slurm_checks(cluster: ClusterConfig) -> list[Check]:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        return [Check("Slurm", False, f"not on PATH: {', '.join(missing)}", "run the launcher on the cluster's "
                      "login node, or load Slurm's module / add its bin folder to PATH")]
    done, err = bounded(lambda: subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                                               timeout=CHECK_TIMEOUT_S))
    if err is not None or done.returncode != 0:
        why = str(err) if err is not None else _last_line(done.stderr)
        return [Check("Slurm", False, f"commands found, but the controller does not answer: {why}",
                      "check slurmctld (scontrol ping) and your Slurm configuration")]
    partitions = [p.rstrip("*") for p in done.stdout.split()]
    wanted = cluster.slurm.partition if cluster.slurm else None
    if wanted and wanted not in partitions:
        return [Check("Slurm", False, f"partition {wanted!r} not found (partitions: {', '.join(partitions)})",
                      "set slurm.partition in the cluster config to one of them")]
    return [Check("Slurm", True, f"{', '.join(SLURM_COMMANDS)} on PATH; controller answers; partitions: "
                  f"{', '.join(partitions)}")]


def vm_checks(cluster: ClusterConfig) -> list[Check]:
    from launcher.vms import ssh
    from launcher.vms.hosts import hosts_from_command

    cfg = cluster.vms
    assert cfg is not None  # ClusterConfig.check: backend vms has a vms: section
    try:
        hosts = list(cfg.hosts) or hosts_from_command(cfg.hosts_command or "", f"cluster config {cluster.name}")
    except UsageError as err:
        return [Check("VMs", False, str(err).splitlines()[0])]
    specs = [dataclasses.replace(s, connect_timeout_s=min(s.connect_timeout_s, SSH_TIMEOUT_S))
             for s in ssh.host_specs(cfg, hosts)]
    answers = asyncio.run(_reach_all(specs))
    return [Check(f"VM {spec.login}", err is None, "answers over SSH" if err is None else _host_error(err),
                  _hint(err)) for spec, err in zip(specs, answers)]


async def _reach_all(specs: list) -> list[Optional[BaseException]]:
    from launcher.vms import ssh

    async def reach(spec: Any) -> Optional[BaseException]:
        try:
            done = await asyncio.wait_for(ssh.run(spec, "true", timeout=SSH_TIMEOUT_S), SSH_TIMEOUT_S * 2)
        except (UsageError, asyncio.TimeoutError) as err:
            return err
        return None if done.ok else UsageError(f"`true` exited with {done.exit_status}")

    return list(await asyncio.gather(*(reach(s) for s in specs)))


def _host_error(err: BaseException) -> str:
    return "no answer in time" if isinstance(err, asyncio.TimeoutError) else str(err).splitlines()[0]


def _hint(err: Optional[BaseException]) -> str:
    return getattr(err, "hint", "") if err is not None else ""


def store_check(cluster: ClusterConfig, store: Optional[str]) -> Check:
    """List the store (the --store folder, else the endpoint's buckets) as the ranks would reach it: through
    jobs.storage, with the cluster config's storage settings and the environment's credentials."""
    from jobs.storage import filesystem, is_s3

    endpoint = cluster.storage.endpoint_url
    if store is None and endpoint is None:
        return Check("checkpoint store", None, "none configured (checkpoints stay in the run directory); "
                     "--store s3://BUCKET/PREFIX checks one")
    uri = store or "s3://"
    shown = redact_text(store) if store else f"the buckets at {endpoint}"
    if is_s3(uri) and not _has_credentials(cluster):
        return Check("checkpoint store", False, f"{shown}: no AWS credentials found",
                     "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage.profile")
    listing, err = bounded(lambda: _list(filesystem(uri, cluster.storage)))
    if err is not None:
        return Check("checkpoint store", False, f"{shown}: cannot be listed: {type(err).__name__}: "
                     f"{one_line(redact_text(str(err)), 200)}", "check that the store is up, storage.endpoint_url "
                     "in the cluster config, and the credentials (AWS_* variables, storage.profile)")
    return Check("checkpoint store", True, f"{shown} answers ({len(listing)} entries)")


def _list(fs_path: tuple[Any, str]) -> list:
    fs, path = fs_path
    try:
        return fs.ls(path, refresh=True)
    except FileNotFoundError:  # a prefix with nothing under it yet: the store answered
        return []


def _has_credentials(cluster: ClusterConfig) -> bool:
    """Whether boto3 finds any credentials (variables, profile, instance role); it never prints them."""
    import boto3

    session = boto3.session.Session(profile_name=cluster.storage.profile)
    return bounded(session.get_credentials, SSH_TIMEOUT_S)[0] is not None


def tracker_check() -> Check:
    """wandb as jobs.tracking starts it: WANDB_MODE, else online with an API key and offline without one."""
    try:
        import wandb  # noqa: F401 - only whether it is installed
    except ImportError:
        return Check("tracker", None, "wandb is not installed: logging.tracker=wandb would fail; none and "
                     "tensorboard work")
    mode_var, key = os.environ.get("WANDB_MODE"), bool(os.environ.get("WANDB_API_KEY"))
    mode = mode_var or ("online" if key else "offline")
    return Check("tracker", None, f"logging.tracker=wandb would run in mode {mode} (WANDB_MODE "
                 f"{mode_var or 'unset'}, WANDB_API_KEY {'is set' if key else 'unset'})")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return one_line(lines[-1], 200) if lines else "(nothing on stderr)"
