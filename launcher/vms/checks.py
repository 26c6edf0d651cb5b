"""What `launch` checks on the VMs before anything is written: every host answers over SSH, has the
interpreter, a recent enough torch, and the same Python and torch versions as the others; and the recipe
fits VMs without a shared file system. And what `launcher doctor` checks of them (`doctor_checks`)."""
from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shlex
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from launcher.checks import CHECK_TIMEOUT_S, SSH_TIMEOUT_S, Check
from launcher.vms import ssh
from launcher.vms.layout import setup_script
from launcher.vms.remote_output import json_object
from launcher.vms.hosts import hosts_from_command
from launcher.vms.ssh import HostError, HostSpec
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.errors import ConfigError, UsageError, one_line, short
from jobs.schema.vms import VmsConfig

PROBE_TIMEOUT_S = 120  # importing torch on a cold VM disk can take tens of seconds
_MARK = "LAUNCHER-HOST-FACTS "  # a login banner or a setup line's output may precede the probe's line
# Runs on each host with vms.python. torch is imported (not only looked up): the version the ranks will
# import and the GPUs they will see, and a torch that fails to import is found here.
PROBE = f"""
import json, platform, socket
try:
    import torch
    t, n = torch.__version__, torch.cuda.device_count()
except ImportError:
    t, n = None, 0
print({_MARK!r} + json.dumps({{"python": platform.python_version(), "torch": t, "cuda_devices": n,
                               "hostname": socket.gethostname()}}))
"""
# pyproject's floor for torch, used where the launcher runs from a checkout that was never installed
_TORCH_FLOOR_FALLBACK = "2.4"


@dataclass(frozen=True)
class HostFacts:
    """What one host's interpreter reported."""

    address: str
    python: str  # e.g. "3.11.2"
    torch: Optional[str]  # e.g. "2.13.0+cpu"; None: not installed
    cuda_devices: int
    hostname: str


def check_hosts(cfg: VmsConfig, hosts: Sequence[str], src: str) -> dict[str, HostFacts]:
    """Reach every host at once and check its interpreter and torch; address -> facts. HostError (a
    UsageError: exit 2) for the first host, in the order given, that fails."""
    if cfg.identity_file:  # once, before any connection, rather than once per host
        ssh.check_key_permissions(os.path.expanduser(cfg.identity_file))
    facts = asyncio.run(ssh.gather_hosts({s.address: probe(s, cfg) for s in ssh.host_specs(cfg, hosts)}))
    for one in facts.values():
        check_torch(one, cfg.interpreter)
    compare_hosts(list(facts.values()))
    return facts


async def probe(spec: HostSpec, cfg: VmsConfig) -> HostFacts:
    """Run the probe after vms.setup (which may activate a virtual environment that vms.python names)."""
    done = await ssh.run(spec, probe_command(cfg), timeout=PROBE_TIMEOUT_S)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)), None)
    if done.exit_status in (126, 127) and line is None:  # the shell's "not found" / "not executable"
        raise HostError(f"{spec.address}: no interpreter {short(cfg.interpreter)} there: {done.last_error_line()}",
                        hint="install Python 3 with torch on the VM, or set vms.python (and vms.setup) to the "
                        "interpreter that has it")
    if not done.ok or line is None:
        raise HostError(f"{spec.address}: {short(cfg.interpreter)} failed (exit status {done.exit_status}): "
                        f"{done.last_error_line()}", hint="run it on the VM to see why; check vms.setup")
    found = json_object(spec.address, "the interpreter's report", line[len(_MARK):])
    try:
        return HostFacts(spec.address, str(found["python"]), None if found["torch"] is None else str(found["torch"]),
                         int(found["cuda_devices"]), str(found["hostname"]))
    except (KeyError, TypeError, ValueError):
        raise HostError(f"{spec.address}: the interpreter's report lacks its fields: {short(line, 120)}",
                        hint="run the launcher's own code on the VM (vms.code_path / vms.python)") from None


def probe_command(cfg: VmsConfig) -> str:
    """vms.setup (which may activate the virtual environment that vms.python names), then the probe: the same
    setup script the node agents run."""
    return setup_script(cfg, f"{shlex.quote(cfg.interpreter)} -c {shlex.quote(PROBE)}")


def torch_floor() -> str:
    """The oldest torch the launcher supports: the installed launcher's `torch>=X` requirement."""
    try:
        requires = importlib.metadata.requires("launcher") or []
    except importlib.metadata.PackageNotFoundError:
        return _TORCH_FLOOR_FALLBACK
    for req in requires:
        m = re.match(r"torch\s*>=\s*([0-9][0-9.]*)\s*(;|,|$)", req)
        if m:
            return m.group(1)
    return _TORCH_FLOOR_FALLBACK


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: "2.13.0+cu121" -> (2, 13, 0), "2.5.0a0" -> (2, 5, 0)."""
    m = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def check_torch(facts: HostFacts, python: str) -> None:
    floor = torch_floor()
    if facts.torch is None:
        raise HostError(f"{facts.address}: torch is not installed for {short(python)} (Python {facts.python})",
                        hint=f"install torch>={floor} on the VM, or set vms.python to an interpreter that "
                        "has it")
    if release(facts.torch) < release(floor):
        raise HostError(f"{facts.address}: torch {facts.torch} is older than the launcher needs (>={floor})",
                        hint=f"upgrade torch on the VM: {short(python)} -m pip install 'torch>={floor}'")


def compare_hosts(facts: Sequence[HostFacts]) -> None:
    """The hosts of one run must agree on Python's minor version (pickled state, checkpoints) and on torch
    (collectives between different builds hang or fail): name the first host that differs from node 0."""
    if not facts:
        return
    first = facts[0]
    for other in facts[1:]:
        for what, mine, theirs in (("Python", _minor(first.python), _minor(other.python)),
                                   ("torch", first.torch, other.torch)):
            if mine != theirs:
                raise HostError(f"hosts disagree: {first.address} has {what} {mine}, {other.address} has "
                                f"{what} {theirs}", hint="install the same versions on every VM (one image)")


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")  # object stores every VM can reach


def check_recipe_on_vms(recipe: RecipeConfig, cluster: ClusterConfig, src: str) -> None:
    """Multi-node VM runs have no shared file system: checkpoints must live in an object store (where
    each rank of a sharded save, FSDP or pipeline, sends its own shard: jobs/checkpoint/spread.py)."""
    nodes, uri = recipe.parallel.nodes, recipe.checkpoint.uri
    if nodes <= 1:
        return
    if not uri or not uri.startswith(REMOTE_SCHEMES):
        shown = f"checkpoint.uri={short(uri)}" if uri else "no checkpoint.uri"
        raise UsageError(one_line(f"{src}: multi-node VM runs have no shared file system, and this run "
                                  f"(parallel.nodes={nodes}) has {shown}", 320),
                         hint="set checkpoint.uri=s3://BUCKET/PREFIX (or gs://...) so every node saves to and "
                         "resumes from the object store")
    _check_min_nodes(recipe, cluster, src)


def _check_min_nodes(recipe: RecipeConfig, cluster: ClusterConfig, src: str) -> None:
    """vms.min_nodes: the run must be able to resume on every size from min_nodes to parallel.nodes (the
    global batch split over fewer replicas, a pipeline's stages on fewer ranks): refused now, not after an
    hour of training when a spot VM does not come back."""
    assert cluster.vms is not None
    least, nodes = cluster.vms.min_nodes, recipe.parallel.nodes
    if least is None:
        return
    if least > nodes:
        raise UsageError(f"cluster config {cluster.name}: vms.min_nodes={least} is more than the recipe's "
                         f"parallel.nodes={nodes}", hint=f"set vms.min_nodes between 1 and {nodes}")
    for size in range(least, nodes):
        try:
            recipe.on_nodes(size).check(recipe.name)
        except ConfigError as err:
            raise UsageError(one_line(f"cluster config {cluster.name}: vms.min_nodes={least} lets this run resume on "
                                      f"{size} of its {nodes} VMs, where {err.key}: {err.message}", 400),
                             hint=f"raise vms.min_nodes to {size + 1}, or change the recipe ({err.hint})"
                             if err.hint else f"raise vms.min_nodes to {size + 1}") from None


# ----------------------------------------------------------------------------- launcher doctor
def doctor_checks(cluster: ClusterConfig) -> list[Check]:
    """`launcher doctor`: each VM reachable over SSH with the configured user and key, each within a few seconds."""
    cfg = cluster.vms
    assert cfg is not None  # ClusterConfig.check: backend vms has a vms: section
    try:
        # bounded as every doctor check is (launch itself waits up to HOSTS_COMMAND_TIMEOUT_S)
        hosts = list(cfg.hosts) or hosts_from_command(cfg.hosts_command or "", f"cluster config {cluster.name}",
                                                      CHECK_TIMEOUT_S)
    except UsageError as err:
        return [Check("VMs", False, str(err).splitlines()[0])]
    specs = [replace(s, connect_timeout_s=min(s.connect_timeout_s, SSH_TIMEOUT_S))
             for s in ssh.host_specs(cfg, hosts)]
    answers = asyncio.run(_reach_all(specs))
    return [Check(f"VM {spec.login}", err is None, "answers over SSH" if err is None else _host_error(err),
                  _hint(err)) for spec, err in zip(specs, answers)]


async def _reach_all(specs: list[HostSpec]) -> list[Optional[BaseException]]:
    async def reach(spec: HostSpec) -> Optional[BaseException]:
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
