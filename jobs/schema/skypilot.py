"""Cluster config section `skypilot:`: what `launcher skypilot` writes into a SkyPilot task file.

SkyPilot provisions the VMs and relaunches a managed job after a preemption; this section says what
to ask it for (resources, spot, recovery) and how our ranks start on its nodes (python, folders).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from jobs.schema.checks import non_empty, non_negative, positive
from jobs.schema.errors import ConfigError, short

# SkyPilot's accelerator syntax: a name and an optional count per node (`A100:8`, `tpu-v5e-8`, `L4`)
_ACCELERATORS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(:[1-9][0-9]*)?")
_RESOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a cloud or region name
_AMOUNT = re.compile(r"[0-9]+(\.[0-9]+)?\+?")  # cpus / memory: `8`, `8+`, `32.5+`


@dataclass(frozen=True)
class SkyPilotConfig:
    """SkyPilot task resources and where our ranks start on its nodes (node 0 = SkyPilot's head node)."""

    cloud: Optional[str] = None  # gcp, aws, ... (default: any cloud SkyPilot is set up for)
    region: Optional[str] = None  # e.g. us-central1 (default: SkyPilot picks)
    accelerators: Optional[str] = None  # per node, e.g. "A100:8": the count must equal parallel.procs_per_node
    cpus: Optional[str] = None  # vCPUs per node, e.g. "8" or "8+" (at least 8)
    memory: Optional[str] = None  # GB per node, e.g. "32+"
    disk_size: Optional[int] = None  # boot disk in GB
    image_id: Optional[str] = None  # VM image (default: SkyPilot's image with CUDA)
    use_spot: bool = False  # spot / preemptible VMs: preemptions are recovered by the managed job
    job_recovery: Literal["EAGER_NEXT_REGION", "FAILOVER"] = "EAGER_NEXT_REGION"  # SkyPilot's recovery strategy
    max_restarts_on_errors: int = 0  # also relaunch after the job itself failed (not only after a preemption)
    setup: tuple[str, ...] = ()  # shell lines run once per node when it is provisioned (pip install ...)
    env: dict[str, str] = field(default_factory=dict)  # environment of every rank; secret entries (a key that
    # looks secret, a value with URL user info or ?token=) are never written into the task file: they are
    # declared there for `sky jobs launch --secret KEY`
    python: str = "python3"  # interpreter on the nodes (with torch and this project's dependencies)
    workdir: Optional[str] = None  # local folder SkyPilot copies to every node (default: this project's folder)
    project_dir: str = "~/sky_workdir"  # this project's folder on the nodes (where SkyPilot puts workdir)
    runs_dir: str = "~/sky_runs"  # run directories on each node's own disk (no folder is shared between nodes)
    master_port: int = 29500  # torchrun's rendezvous port on the head node
    # spot VMs on gcp or aws: each node watches its metadata service and the ranks save on a notice
    metadata_url: Optional[str] = None  # default http://169.254.169.254 (the tests point it at loopback)
    notice_hold_s: int = 600  # after saving on a notice, wait this long for the VM to be taken away

    def check(self, src: str) -> None:
        for key in ("cloud", "region"):
            _matches(src, key, getattr(self, key), _RESOURCE, "a name such as gcp, aws or us-central1")
        _matches(src, "accelerators", self.accelerators, _ACCELERATORS, "NAME or NAME:COUNT, e.g. A100:8")
        for key in ("cpus", "memory"):
            _matches(src, key, getattr(self, key), _AMOUNT, "a number, or at least that many: 8+")
        if self.disk_size is not None:
            positive(src, "skypilot.disk_size", self.disk_size)
        non_negative(src, "skypilot.max_restarts_on_errors", self.max_restarts_on_errors)
        for key in ("image_id", "workdir"):
            non_empty(src, f"skypilot.{key}", getattr(self, key))
        for key in ("python", "project_dir", "runs_dir"):
            if not getattr(self, key).strip():
                raise ConfigError(src, f"skypilot.{key}", "is empty", "set a value, or leave it out")
        non_empty(src, "skypilot.metadata_url", self.metadata_url)
        if self.metadata_url and not self.metadata_url.startswith(("http://", "https://")):
            raise ConfigError(src, "skypilot.metadata_url", f"{short(self.metadata_url)} is not an http(s) URL")
        positive(src, "skypilot.notice_hold_s", self.notice_hold_s)
        if not 0 < self.master_port < 65536:
            raise ConfigError(src, "skypilot.master_port", f"{short(self.master_port)} is not a TCP port",
                              "use 1-65535")

    @property
    def notice_provider(self) -> str:
        """Whose spot notices the nodes watch: gce on GCP, aws on AWS, for spot VMs only; else none."""
        return {"gcp": "gce", "aws": "aws"}.get((self.cloud or "").lower(), "none") if self.use_spot else "none"

    @property
    def gpus_per_node(self) -> int:
        """The accelerator count per node (1 when only a name is given, 0 without accelerators)."""
        if self.accelerators is None:
            return 0
        _, _, count = self.accelerators.partition(":")
        return int(count or 1)


def _matches(src: str, key: str, value: Optional[str], pattern: re.Pattern[str], what: str) -> None:
    if value is not None and not pattern.fullmatch(value):
        raise ConfigError(src, f"skypilot.{key}", f"{short(value)} is not {what}")
