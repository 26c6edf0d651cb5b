"""Cluster config sections: where to run (backend, runs directory, object storage, Slurm options)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from jobs.schema.checks import MAX_TIME_MIN, non_empty, non_negative, positive
from jobs.schema.errors import ConfigError, short, short_path
from jobs.schema.skypilot import SkyPilotConfig
from jobs.schema.vms import VmsConfig

if TYPE_CHECKING:
    from jobs.schema.recipe import RecipeConfig

@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, Ceph, moto); default AWS_ENDPOINT_URL or AWS
    region: Optional[str] = None  # S3 region; default AWS_DEFAULT_REGION
    profile: Optional[str] = None  # AWS profile name; default AWS_PROFILE

    def check(self, src: str) -> None:
        for key in ("endpoint_url", "region", "profile"):
            non_empty(src, f"storage.{key}", getattr(self, key))
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(src, "storage.endpoint_url", f"{short(self.endpoint_url)} is not an http(s) URL")


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str] = None  # --partition
    account: Optional[str] = None  # --account
    qos: Optional[str] = None  # --qos
    time_min: int = 60  # --time, in minutes
    gpus_per_node: int = 0  # --gpus-per-node; must equal parallel.procs_per_node when > 0
    cpus_per_task: int = 1  # --cpus-per-task
    mem_gb: Optional[int] = None  # --mem per node, in GB
    constraint: Optional[str] = None  # --constraint
    exclusive: bool = False  # --exclusive
    extra_sbatch: tuple[str, ...] = ()  # further #SBATCH options, e.g. "--reservation=x"
    setup: tuple[str, ...] = ()  # shell lines run before the ranks start (module load, venv activation)
    env: dict[str, str] = field(default_factory=dict)  # environment variables passed to every rank
    grace_period_s: int = 120  # USR2 this long before the end: time to save and flush a checkpoint
    max_preemptions: int = 20  # requeues after preemption before giving up
    max_timeouts: int = 10  # requeues after hitting the time limit before giving up
    max_failures: int = 1  # requeues after a crash before giving up
    python: Optional[str] = None  # interpreter on the compute nodes; default the launching one

    def check(self, src: str) -> None:
        for key in ("partition", "account", "qos", "constraint", "python"):
            non_empty(src, f"slurm.{key}", getattr(self, key))
        for i, option in enumerate(self.extra_sbatch):
            non_empty(src, f"slurm.extra_sbatch[{i}]", option)
        positive(src, "slurm.time_min", self.time_min)
        if self.time_min > MAX_TIME_MIN:
            raise ConfigError(src, "slurm.time_min", f"{self.time_min} minutes is more than 365 days",
                              f"use at most {MAX_TIME_MIN} (Slurm partitions usually allow far less: "
                              "see `sinfo -o %l`)")
        if self.mem_gb is not None:
            positive(src, "slurm.mem_gb", self.mem_gb)
        non_negative(src, "slurm.gpus_per_node", self.gpus_per_node)
        positive(src, "slurm.cpus_per_task", self.cpus_per_task)
        positive(src, "slurm.grace_period_s", self.grace_period_s)
        if self.time_min * 60 <= self.grace_period_s:
            raise ConfigError(src, "slurm.time_min",
                              f"{self.time_min} min is not longer than the grace period of {self.grace_period_s} s",
                              "raise slurm.time_min or lower slurm.grace_period_s")
        for key in ("max_preemptions", "max_timeouts", "max_failures"):
            non_negative(src, f"slurm.{key}", getattr(self, key))


@dataclass(frozen=True)
class ClusterConfig:
    name: str  # config name
    backend: Literal["local", "slurm", "vms"] = "local"  # what starts the ranks
    runs_dir: str = "runs"  # run directories live here (relative to the directory of the command unless absolute)
    # folders every node sees (a shared file system, e.g. /home, /shared): when set, the run directory and the
    # user's code must be inside one, since ranks on other machines read and write them
    shared_paths: tuple[str, ...] = ()
    storage: StorageConfig = field(default_factory=StorageConfig)
    slurm: Optional[SlurmConfig] = None  # required when backend is slurm
    vms: Optional[VmsConfig] = None  # required when backend is vms
    skypilot: Optional[SkyPilotConfig] = None  # what `launcher skypilot` writes into a SkyPilot task file

    def check(self, src: str) -> None:
        non_empty(src, "name", self.name)
        non_empty(src, "runs_dir", self.runs_dir)
        for i, path in enumerate(self.shared_paths):
            non_empty(src, f"shared_paths[{i}]", path)
            if not path.startswith("/"):
                raise ConfigError(src, f"shared_paths[{i}]", f"{short(path)} is not an absolute path",
                                  "list absolute folders, e.g. /home or /shared")
        self.storage.check(src)
        if self.backend == "slurm" and self.slurm is None:
            raise ConfigError(src, "slurm", "backend is slurm but there is no slurm: section",
                              "add a slurm: section (partition, time_min, ...)")
        if self.slurm is not None:
            self.slurm.check(src)
        if self.backend == "vms" and self.vms is None:
            raise ConfigError(src, "vms", "backend is vms but there is no vms: section",
                              "add a vms: section (hosts or hosts_command, user, identity_file, ...)")
        if self.vms is not None:
            self.vms.check(src)
        if self.skypilot is not None:
            self.skypilot.check(src)

    @property
    def nodes_share_run_dir(self) -> bool:
        """Whether every node sees rank 0's run directory: not on VMs (SSH or SkyPilot) unless shared_paths
        says there is a shared file system. Where they do not, a multi-node run resumes from checkpoint.uri."""
        return not (self.backend == "vms" or self.skypilot is not None) or bool(self.shared_paths)

    def check_shared(self, what: str, path: str, src: str) -> None:
        """`path` (absolute) must be on the shared file system, where `shared_paths` says what that is."""
        # `path` is resolved (code_dir, the runs directory): a listed folder counts as written and resolved,
        # so that a symlink such as /home -> /mnt/home is the same file system
        folders = [f.rstrip("/") for p in self.shared_paths for f in (p, os.path.realpath(p))]
        if folders and not any(path == f or path.startswith(f + "/") for f in folders):
            raise ConfigError(src, "shared_paths", f"{what} {short_path(path)} is not inside "
                              f"{', '.join(self.shared_paths)}, so other nodes cannot see it",
                              "move it onto the shared file system, or add its folder to shared_paths")

    def check_recipe(self, recipe: RecipeConfig, src: str) -> None:
        """Rules that need both files, e.g. one rank per GPU."""
        s = self.slurm
        if self.backend == "slurm" and s is not None and s.gpus_per_node > 0 \
                and s.gpus_per_node != recipe.parallel.procs_per_node:
            raise ConfigError(src, "slurm.gpus_per_node",
                              f"{s.gpus_per_node} GPUs per node but the recipe runs "
                              f"parallel.procs_per_node={recipe.parallel.procs_per_node} ranks per node",
                              f"set parallel.procs_per_node={s.gpus_per_node} (one rank per GPU)")
