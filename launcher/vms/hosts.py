"""Which VMs a run uses: the cluster config's `vms.hosts`, or what `vms.hosts_command` prints (re-run at every
(re)launch, so a VM that a managed instance group or auto scaling group replaced is found under its new
address)."""
from __future__ import annotations

import re
import subprocess
from typing import Sequence

from jobs.schema.errors import ConfigError, one_line, short
from jobs.schema.vms import VmsConfig

HOSTS_COMMAND_TIMEOUT_S = 120  # a cloud CLI listing instances takes seconds; a hung one must not hang launch
# a DNS name, an IPv4 address or an IPv6 address (no spaces, no option-like leading "-", no shell characters)
_HOST = re.compile(r"^(?!-)[A-Za-z0-9._:%-]+$")


def resolve_hosts(cfg: VmsConfig, src: str, nodes: int) -> list[str]:
    """The first `nodes` hosts (node 0 first); ConfigError if there are fewer, or the command fails."""
    if cfg.hosts:
        hosts, key, what = list(cfg.hosts), "vms.hosts", "lists"
    else:
        hosts, key, what = hosts_from_command(cfg.hosts_command or "", src), "vms.hosts_command", "printed"
    if len(hosts) < nodes:
        raise ConfigError(src, key, f"the recipe asks for parallel.nodes={nodes} but {key} {what} "
                          f"{len(hosts)} host{'s' if len(hosts) != 1 else ''}: {', '.join(hosts)}",
                          f"start more VMs, or set parallel.nodes={len(hosts)}")
    return hosts[:nodes]


def hosts_from_command(command: str, src: str) -> list[str]:
    """Run `command` here (bash -c) and read one host per line from its output; blank lines are skipped."""
    key, shown = "vms.hosts_command", short(command, 60)
    try:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, errors="replace",
                              timeout=HOSTS_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(src, key, f"{shown} did not finish within {HOSTS_COMMAND_TIMEOUT_S} s",
                          "run it in a shell to see why (a login prompt? a slow API?)") from None
    if done.returncode != 0:
        raise ConfigError(src, key, f"{shown} exited with status {done.returncode}: {_last_line(done.stderr)}",
                          "run it in a shell to see why (logged in to the cloud CLI?)")
    hosts = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if not hosts:
        raise ConfigError(src, key, f"{shown} printed no hosts", "are the VMs running, and does its "
                          "filter match them?")
    _check_printed(hosts, shown, src)
    return hosts


def _check_printed(hosts: Sequence[str], shown: str, src: str) -> None:
    for host in hosts:
        if not _HOST.match(host):
            raise ConfigError(src, "vms.hosts_command", f"{shown} printed {short(host, 60)}, which is not a "
                              "host name or address", "make it print one address per line and nothing else")
    seen = set()
    for host in hosts:
        if host in seen:
            raise ConfigError(src, "vms.hosts_command", f"{shown} printed {host} twice",
                              "make it print each VM once")
        seen.add(host)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return one_line(lines[-1], 160) if lines else "(nothing on stderr)"
