"""Which VMs a run uses: the cluster config's `vms.hosts`, or what `vms.hosts_command` prints (re-run at every
(re)launch, so a VM that a managed instance group or auto scaling group replaced is found under its new
address)."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional, Sequence

from jobs.schema.errors import ConfigError, one_line, short
from jobs.schema import RecipeConfig
from jobs.schema.vms import VmsConfig, valid_host

HOSTS_COMMAND_TIMEOUT_S = 120  # a cloud CLI listing instances takes seconds; a hung one must not hang launch


def resolve_hosts(cfg: VmsConfig, src: str, nodes: int) -> list[str]:
    """The run's `nodes` hosts (node 0 first): the first ones, or from vms.host_offset on; ConfigError if there are
    fewer, or the command fails."""
    hosts = listed_hosts(cfg, src)
    key, what = ("vms.hosts", "lists") if cfg.hosts else ("vms.hosts_command", "printed")
    first = cfg.host_offset
    if len(hosts) < first + nodes:
        asked = f"parallel.nodes={nodes}" + (f" from vms.host_offset={first} on" if first else "")
        raise ConfigError(src, key, f"the recipe asks for {asked} but {key} {what} "
                          f"{len(hosts)} host{'s' if len(hosts) != 1 else ''}: {', '.join(hosts)}",
                          f"start more VMs, or set parallel.nodes={max(1, len(hosts) - first)}")
    return hosts[first:first + nodes]


def listed_hosts(cfg: VmsConfig, src: str) -> list[str]:
    """Every host the config lists or its command prints now, node 0 first (vms.host_offset not applied)."""
    return list(cfg.hosts) if cfg.hosts else hosts_from_command(cfg.hosts_command or "", src)


def launch_size(answering: int, nodes: int, min_nodes: Optional[int], waited_out: bool) -> Optional[int]:
    """How many nodes the next launch gets: every one of `nodes` once they answer; once vms.host_wait_s has
    passed (`waited_out`), the ones that answer if they are at least vms.min_nodes; None: no launch now."""
    if answering >= nodes:
        return nodes
    if waited_out and min_nodes is not None and answering >= min_nodes:
        return answering
    return None


def resize_line(before: int, size: int, recipe: RecipeConfig, cfg: VmsConfig) -> Optional[str]:
    """The line for `launcher logs` when a launch has another number of VMs than the last (None if not)."""
    if size == before:
        return None
    nodes = recipe.parallel.nodes
    how = f"on {size} of its {nodes} VMs (vms.min_nodes={cfg.min_nodes}): the others did not answer within " \
          f"vms.host_wait_s={cfg.host_wait_s} s" if size < nodes else f"on all {nodes} VMs again"
    return f"the run resumes {how}; the global batch stays {recipe.trainer.global_batch}"


def hosts_from_command(command: str, src: str, timeout_s: float = HOSTS_COMMAND_TIMEOUT_S) -> list[str]:
    """Run `command` here (bash -c) and read one host per line from its output; blank lines are skipped."""
    key, shown = "vms.hosts_command", short(command, 60)
    done = _run_bounded(command, timeout_s)
    if done is None:
        raise ConfigError(src, key, f"{shown} did not finish within {timeout_s:g} s (timed out, stopped)",
                          "run it in a shell to see why (a login prompt? a slow API?)")
    if done.returncode != 0:
        raise ConfigError(src, key, f"{shown} exited with status {done.returncode}: {_last_line(done.stderr)}",
                          "run it in a shell to see why (logged in to the cloud CLI?)")
    hosts = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if not hosts:
        raise ConfigError(src, key, f"{shown} printed no hosts", "are the VMs running, and does its "
                          "filter match them?")
    _check_printed(hosts, shown, src)
    return hosts


def _run_bounded(command: str, timeout_s: float) -> "subprocess.CompletedProcess[str] | None":
    """bash -c COMMAND in a session of its own; None if it ran past `timeout_s`, after killing its whole process
    group: a cloud CLI's children (a credential helper, a pager) must not outlive it holding the pipe open."""
    proc = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a child that left the group still holds the pipe: not waited for
            proc.wait()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check_printed(hosts: Sequence[str], shown: str, src: str) -> None:
    for host in hosts:
        if not valid_host(host):
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
