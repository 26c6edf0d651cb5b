"""SkyPilot task files: `launcher skypilot RECIPE --cluster C` writes a task YAML for `sky jobs launch`.

SkyPilot provisions the nodes and, for a managed job, relaunches it after a preemption (and after a
failure, up to `max_restarts_on_errors`); our checkpoints make the relaunch resume instead of
restarting. The task's `run` command starts `jobs.environments.skypilot` on every node, which prepares
the node's run directory (keyed by SKYPILOT_TASK_ID, the same across recoveries) and execs torchrun.

What reaches the file, and why none of it runs as unintended shell code:
- `run`: every value (python, folders, run name, numbers) goes through `shlex.quote` (a leading `~/`
  becomes `"$HOME"/` followed by the quoted rest, so it still means the node's home);
- `skypilot.setup`: shell lines by design, inserted verbatim, one line each (a newline in an entry
  would smuggle in lines it does not show);
- `envs`: YAML values, which SkyPilot exports with `shlex.quote` itself; the resolved configs travel as
  base64 in `LAUNCHER_RUN` (one self-contained file to hand to SkyPilot; a file beside it carried by
  `file_mounts` would depend on the directory `sky` is run from). Secrets are never written: entries
  of `skypilot.env` that are secret (a key that looks secret, or a value holding a URL's user info or
  a `?token=`: `is_secret_entry`) are declared under `secrets:` with no value, for
  `sky jobs launch --secret KEY` (the value from the user's shell); a credential elsewhere in the
  recipe or cluster config is refused.
"""
from __future__ import annotations

import re
import shlex
import stat
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from jobs.environments.skypilot import ENTRY_MODULE, RUN_VARIABLE, TASK_HASH_CHARS, encode_configs
from launcher.backends.slurm_options import one_line
from launcher.shell import shell_path
from jobs.schema import ClusterConfig, ConfigError, RecipeConfig, REPO_ROOT, UsageError, to_dict
from jobs.schema.errors import short_path
from jobs.schema.names import check_name
from jobs.schema.secrets import is_secret_entry, redact, split
from jobs.schema.skypilot import SkyPilotConfig

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED = re.compile(rf"{RUN_VARIABLE}|SKYPILOT_.*")  # set by us or by SkyPilot: an entry would hide them


def skypilot_section(cluster: ClusterConfig) -> SkyPilotConfig:
    if cluster.skypilot is None:
        raise UsageError(f"cluster config {cluster.name!r} has no skypilot: section, which says what the task "
                         "asks SkyPilot for", hint="add one (accelerators, use_spot, job_recovery, setup, ...); "
                         "see cluster_configs/examples/skypilot_gcp.yaml")
    return cluster.skypilot


# ----------------------------------------------------------------------------- checks
def check_task(recipe: RecipeConfig, cluster: ClusterConfig, base: str) -> SkyPilotConfig:
    """Everything the task file needs, refused with one line before anything is written."""
    sky, src, rsrc = skypilot_section(cluster), f"cluster config {cluster.name}", f"recipe {recipe.name}"
    if recipe.script is not None:
        raise UsageError(f"{rsrc} runs a script; SkyPilot task files start trainer recipes",
                         hint="run the script from the task's run command yourself, or use a trainer recipe")
    nodes = recipe.parallel.nodes
    if nodes > 1 and not recipe.checkpoint.uri:
        raise ConfigError(rsrc, "checkpoint.uri", f"a {nodes}-node SkyPilot task needs checkpoint.uri: its nodes "
                          "share no folder, and a recovered job resumes from there",
                          "set checkpoint.uri=s3://BUCKET/PREFIX (or gs://...)")
    if sky.accelerators is not None and sky.gpus_per_node != recipe.parallel.procs_per_node:
        raise ConfigError(src, "skypilot.accelerators", f"{sky.accelerators!r} gives {sky.gpus_per_node} GPUs per "
                          f"node but the recipe runs parallel.procs_per_node={recipe.parallel.procs_per_node}",
                          f"set parallel.procs_per_node={sky.gpus_per_node} (one rank per GPU)")
    check_name("run name on the nodes (with the task id's hash)", f"{base}-{'0' * TASK_HASH_CHARS}")
    _refuse_secrets(rsrc, to_dict(recipe), allowed=None)
    _refuse_secrets(src, to_dict(cluster), allowed=("skypilot", "env"))  # declared for --secret, never written
    for key in ("python", "project_dir", "runs_dir", "workdir", "image_id"):
        if getattr(sky, key) is not None:
            one_line(src, f"skypilot.{key}", getattr(sky, key))
    for i, line in enumerate(sky.setup):
        one_line(src, f"skypilot.setup[{i}]", line)
    for key, value in sky.env.items():
        if not _SHELL_NAME.fullmatch(key) or _RESERVED.fullmatch(key):
            raise ConfigError(src, f"skypilot.env.{key}", f"{key!r} cannot be set here", "use letters, digits "
                              f"and underscores, not starting with a digit; {RUN_VARIABLE} and SKYPILOT_* are taken")
        one_line(src, f"skypilot.env.{key}", value)
    one_line(src, "name", cluster.name)
    return sky


def _refuse_secrets(src: str, tree: dict[str, Any], allowed: Optional[tuple[str, ...]]) -> None:
    """A credential anywhere in `tree` but under the `allowed` keys is refused (the nodes would get `***`)."""
    for path, _ in split(tree)[1]:
        if allowed is None or path[:len(allowed)] != allowed:
            raise ConfigError(src, ".".join(path), "holds a credential, and a SkyPilot task file carries none",
                              "give it to the job in an environment variable: skypilot.env KEY, passed with "
                              "`sky jobs launch --secret KEY`")


# ----------------------------------------------------------------------------- rendering
class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as literal blocks: the file shows the shell lines as they run."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def _section(key: str, value: Any) -> str:
    return yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, width=1 << 20)


def render_task(recipe: RecipeConfig, cluster: ClusterConfig, base: str) -> str:
    """The whole task file: checked first (`check_task`), so a refused value writes nothing."""
    sky = check_task(recipe, cluster, base)
    hidden = [key for key, value in sky.env.items() if is_secret_entry(key, value)]
    envs = {key: value for key, value in sky.env.items() if key not in hidden}
    envs[RUN_VARIABLE] = encode_configs(to_dict(recipe), redact(to_dict(cluster)))
    parts = [_header(recipe, cluster, base, hidden),
             _section("name", base), _section("num_nodes", recipe.parallel.nodes),
             _section("resources", resources(sky)),
             "# copied to ~/sky_workdir on every node (skypilot.workdir)\n",
             _section("workdir", sky.workdir or str(REPO_ROOT)),
             f"# {RUN_VARIABLE}: the resolved recipe and cluster config, no secrets (to read it: "
             "echo VALUE | base64 -d | gunzip)\n",
             _section("envs", envs)]
    if hidden:
        parts += ["# never written here: pass them from your shell, e.g. sky jobs launch --secret "
                  f"{hidden[0]} THIS_FILE (SkyPilot before 0.10: move them to envs, pass --env KEY)\n",
                  _section("secrets", {key: None for key in hidden})]
    if sky.setup:
        parts += ["# skypilot.setup: shell lines from the cluster config, run on every node once provisioned\n",
                  _section("setup", "\n".join(sky.setup) + "\n")]
    parts += ["# on every node: prepare its run directory (keyed by SKYPILOT_TASK_ID), then exec torchrun\n",
              _section("run", run_command(sky, recipe, base))]
    return "".join(parts)


def _header(recipe: RecipeConfig, cluster: ClusterConfig, base: str, hidden: list[str]) -> str:
    secrets = "".join(f" --secret {key}" for key in hidden)
    return (f"# SkyPilot task for run {base}: recipe {recipe.name} on cluster config {cluster.name}, "
            "written by `launcher skypilot`.\n"
            f"# Launch as a managed job: sky jobs launch{secrets} THIS_FILE\n"
            "# A recovered job (preempted, or failed within max_restarts_on_errors) resumes from its newest "
            "checkpoint;\n# a new `sky jobs launch` is a new run (the run is keyed by SKYPILOT_TASK_ID).\n")


def resources(sky: SkyPilotConfig) -> dict[str, Any]:
    optional = {"cloud": sky.cloud, "region": sky.region, "accelerators": sky.accelerators, "cpus": sky.cpus,
                "memory": sky.memory, "disk_size": sky.disk_size, "image_id": sky.image_id}
    return {**{k: v for k, v in optional.items() if v is not None}, "use_spot": sky.use_spot,
            "job_recovery": {"strategy": sky.job_recovery, "max_restarts_on_errors": sky.max_restarts_on_errors}}


def run_command(sky: SkyPilotConfig, recipe: RecipeConfig, base: str) -> str:
    entry = [shell_path(sky.python), "-m", ENTRY_MODULE,
             *(shlex.quote(a) for a in ("--run-name", base, "--runs-dir", sky.runs_dir,
                                        "--nproc-per-node", str(recipe.parallel.procs_per_node),
                                        "--master-port", str(sky.master_port)))]
    return "\n".join(["set -e", f"cd {shell_path(sky.project_dir)}",
                      'export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"', "exec " + " ".join(entry)]) + "\n"


# ----------------------------------------------------------------------------- the command
def write_task(recipe: RecipeConfig, cluster: ClusterConfig, base: str, out: Optional[str]) -> int:
    """`launcher skypilot`: the task file on stdout, or in `out` (then a note on stderr). A refusal comes
    alone, before any warning: `out` is checked first, the warning printed once the file is written."""
    if out is not None:
        _check_out(out)
    text = render_task(recipe, cluster, base)
    if out is None:
        sys.stdout.write(text)
    else:
        try:
            Path(out).write_text(text)
        except OSError as err:
            raise UsageError(f"--out {short_path(out)}: cannot write it: {err.strerror or err}",
                             hint="give a file in a folder that exists and that you may write") from None
    if not recipe.checkpoint.uri:
        print("warning: no checkpoint.uri: checkpoints stay on the VM, so a recovered job (a new VM) starts "
              "from step 0; set checkpoint.uri=s3://... or gs://...", file=sys.stderr)
    if out is not None:
        print(f"wrote {out}: launch it with `sky jobs launch {shlex.quote(out)}`", file=sys.stderr)
    return 0


def _check_out(out: str) -> None:
    """--out names a file to (over)write: not empty, not a folder, and not a FIFO or a device, which
    opening for writing would block on (a FIFO waits for a reader) or write into."""
    path = Path(out)
    try:
        what = "" if not out.strip() else _not_a_file(path.stat().st_mode) if path.exists() else ""
    except OSError as err:  # a name too long, a folder on the way that is not one
        what = err.strerror or str(err)
    if not out.strip() or what:
        raise UsageError(f"--out {short_path(out)}: {what or 'is empty'}",
                         hint="give the path of the task file to write, e.g. --out task.yaml")


def _not_a_file(mode: int) -> str:
    return "" if stat.S_ISREG(mode) else "is a folder" if stat.S_ISDIR(mode) else "is not a regular file"
