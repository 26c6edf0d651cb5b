"""Cluster config sections for cloud VMs reached over SSH (`backend: vms`) and SkyPilot task files."""
from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from jobs.schema.checks import non_empty, non_negative, positive
from jobs.schema.errors import ConfigError, short
from jobs.schema.globs import compile_pattern

HOST_FIELD = "{host}"  # in remote_dir and metadata_url: replaced by each host's own address
# a DNS name: dot-separated labels of letters, digits, "-" and "_" (internal names), none beginning with "-"
_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # what a shell and execve take as a variable name


def valid_host(host: str) -> bool:
    """A host name or an IPv4/IPv6 address (with a %zone): nothing a shell or ssh would read otherwise."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(host)) and not host.replace(".", "").isdigit()


@dataclass(frozen=True)
class VmsConfig:
    """Where the VMs are, how to reach them, what runs there. Node 0 is the first host listed (or printed)."""

    hosts: tuple[str, ...] = ()  # addresses or names, first = node 0 (it also runs the run's supervisor)
    # or: a shell command printing one host per line, run at every (re)launch so replaced VMs are found,
    # e.g. gcloud compute instances list --filter=labels.job=x --format='value(networkInterfaces[0].networkIP)'
    hosts_command: Optional[str] = None
    user: Optional[str] = None  # SSH user (default: this machine's user)
    identity_file: Optional[str] = None  # private key (default: the SSH agent, then ~/.ssh/id_*)
    port: int = 22
    known_hosts: Optional[str] = None  # known_hosts file (default ~/.ssh/known_hosts); "ignore": no host key check
    connect_timeout_s: int = 15
    # each VM's own folder for runs and synced code; "{host}" is replaced by the host's address (for several
    # "VMs" on one machine, as the tests run them); "~" is the SSH user's home on the VM
    remote_dir: str = "~/launcher"
    code: Literal["sync", "image"] = "sync"  # sync: copy the project and code_dir over at launch; image: already there
    code_path: Optional[str] = None  # with code: image, the project's folder on the VMs
    # with code: sync, gitignore-style patterns of the code folder's files not to copy (besides the defaults:
    # keys, secrets, run folders, hidden files; and the code folder's .launcherignore)
    sync_exclude: tuple[str, ...] = ()
    sync_max_mb: int = 100  # with code: sync, the most the copied code may weigh: data belongs in a bucket
    # interpreter on the VMs (with torch installed); default: the launching one's path (the same image)
    python: Optional[str] = None
    setup: tuple[str, ...] = ()  # shell lines run before the ranks start (venv activation, ...), each on its own line
    env: dict[str, str] = field(default_factory=dict)  # environment variables for every rank
    provider: Literal["none", "gce", "aws"] = "none"  # whose spot/preemption notices to watch
    metadata_url: Optional[str] = None  # metadata service (default http://169.254.169.254); "{host}" allowed
    notice_poll_s: float = 5.0  # AWS: how often spot/instance-action is polled (GCE long-polls)
    rdzv_port: int = 29400  # torchrun's c10d rendezvous on node 0
    host_wait_s: int = 600  # after a preemption or failure, wait this long for every host to answer again
    # then resume on the hosts that answer, if at least this many (default: every one of parallel.nodes); the
    # global batch is kept (more micro-batches per step), and the next relaunch grows back when they return
    min_nodes: Optional[int] = None
    max_preemptions: int = 20  # relaunches after a spot notice before giving up
    max_failures: int = 1  # relaunches after a crash or a lost node before giving up
    # where the run's supervisor runs (it follows the nodes and relaunches them): default node 0; another VM (an
    # on-demand one beside spot nodes) keeps it when the nodes are preempted. A sweep's trials use node 0 of the pool
    supervisor_host: Optional[str] = None
    host_offset: int = 0  # the run's nodes are the hosts from this index on (a sweep's worker i: i x parallel.nodes)

    @property
    def interpreter(self) -> str:
        """vms.python, or this process's own interpreter: on the user's machine the one launching, on node 0
        the supervisor's, which the launch started with the same value."""
        return self.python or sys.executable

    def check(self, src: str) -> None:
        if bool(self.hosts) == bool(self.hosts_command):
            raise ConfigError(src, "vms.hosts", "give either vms.hosts (a list) or vms.hosts_command, not "
                              f"{'both' if self.hosts else 'neither'}",
                              "list the VMs' addresses, or a command that prints them one per line")
        for i, host in enumerate(self.hosts):
            non_empty(src, f"vms.hosts[{i}]", host)
            if not valid_host(host):
                raise ConfigError(src, f"vms.hosts[{i}]", f"{short(host)} is not a host name or address",
                                  "list each VM's DNS name or IP address (e.g. 10.0.0.5), nothing else")
        if self.supervisor_host is not None and not valid_host(self.supervisor_host):
            raise ConfigError(src, "vms.supervisor_host", f"{short(self.supervisor_host)} is not a host name or "
                              "address", "give one VM's DNS name or IP address, or leave it out (node 0)")
        if len(set(self.hosts)) != len(self.hosts):
            raise ConfigError(src, "vms.hosts", "a host is listed twice", "list each VM once")
        for key in ("hosts_command", "user", "identity_file", "known_hosts", "code_path", "metadata_url", "python"):
            non_empty(src, f"vms.{key}", getattr(self, key))
        non_empty(src, "vms.remote_dir", self.remote_dir)
        if not 0 < self.port < 65536:
            raise ConfigError(src, "vms.port", f"{short(self.port)} is not a TCP port", "use 1-65535 (SSH: 22)")
        if not 0 < self.rdzv_port < 65536:
            raise ConfigError(src, "vms.rdzv_port", f"{short(self.rdzv_port)} is not a TCP port", "use 1-65535")
        if self.code == "image" and not self.code_path:
            raise ConfigError(src, "vms.code_path", "code: image needs the project's folder on the VMs",
                              "set vms.code_path, or use code: sync")
        if self.metadata_url and not self.metadata_url.startswith(("http://", "https://")):
            raise ConfigError(src, "vms.metadata_url", f"{short(self.metadata_url)} is not an http(s) URL")
        self._check_env_and_sync(src)
        for key in ("connect_timeout_s", "host_wait_s", "notice_poll_s"):
            positive(src, f"vms.{key}", getattr(self, key))
        if self.min_nodes is not None:
            positive(src, "vms.min_nodes", self.min_nodes)
        for key in ("max_preemptions", "max_failures", "host_offset"):
            non_negative(src, f"vms.{key}", getattr(self, key))

    def _check_env_and_sync(self, src: str) -> None:
        for i, line in enumerate(self.setup):
            if line.rstrip().endswith("\\"):  # each line runs on its own, followed by a check of its status
                raise ConfigError(src, f"vms.setup[{i}]", f"{short(line)} continues onto the next line",
                                  "give each command whole, as one list item")
        for key, value in self.env.items():
            if not _ENV_KEY.match(key):
                raise ConfigError(src, "vms.env", f"{short(key)} is not an environment variable name",
                                  "use letters, digits and _, not starting with a digit (e.g. HF_HOME)")
            if "\0" in value:  # no process can be given it
                raise ConfigError(src, f"vms.env.{key}", "holds a NUL character", "remove it")
        for i, pattern in enumerate(self.sync_exclude):
            try:
                compile_pattern(pattern)
            except ValueError as err:
                raise ConfigError(src, f"vms.sync_exclude[{i}]", f"{short(pattern)} {err}",
                                  "write gitignore-style patterns, e.g. data/ or *.ckpt") from None
        positive(src, "vms.sync_max_mb", self.sync_max_mb)
