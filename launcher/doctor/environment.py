"""`launcher doctor` without a run: what a launch on this cluster config needs, checked from here, each check
bounded to a few seconds. Absent GPUs are information, not a failure: a login node or a laptop has none.
What a backend needs besides (Slurm's commands, the VMs over SSH) its module checks (`environment_checks`)."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any, Optional

from launcher import backends
from launcher.checks import SSH_TIMEOUT_S, Check, bounded
from jobs.schema import ClusterConfig
from jobs.schema.errors import one_line
from jobs.schema.secrets import redact_text


def check_environment(cluster: ClusterConfig, store: Optional[str]) -> list[Check]:
    """What every backend needs, with the cluster config's backend's own checks (Backend.environment_checks)."""
    checks = [*torch_checks(), runs_dir_check(cluster), *backends.get(cluster.backend).environment_checks(cluster)]
    return [*checks, store_check(cluster, store), tracker_check()]


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
    missing = _credentials_missing(cluster) if is_s3(uri) else None
    if missing:
        return Check("checkpoint store", False, f"{shown}: {missing}",
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


def _credentials_missing(cluster: ClusterConfig) -> Optional[str]:
    """Why boto3 finds no credentials (variables, profile, instance role), or None; it never prints them."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:  # a storage.profile that ~/.aws/config lacks raises here (ProfileNotFound)
        session = boto3.session.Session(profile_name=cluster.storage.profile)
    except BotoCoreError as err:
        return (f"cluster config {cluster.name}: storage.profile {cluster.storage.profile!r} cannot be used: "
                f"{one_line(str(err), 200)}")
    return None if bounded(session.get_credentials, SSH_TIMEOUT_S)[0] is not None else "no AWS credentials found"


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
