"""Slurm options from a cluster config, computed and validated in one place for both paths that
submit: submitit's sbatch file (`launcher launch`, sweeps) and `launcher sbatch`'s script. Both
take their `#SBATCH` options from `job_options`; each adds only what its own script does
differently (submitit: `--signal` to every task; `launcher sbatch`: `--signal=B:` to the shell).

What reaches a batch script, and why none of it can run as shell code:
- option values (`#SBATCH --key=value`): single printable lines; bash sees a comment, and each
  path quotes the value for sbatch's own parser (whitespace splits, quotes group, a backslash
  escapes even inside quotes, `#` starts a comment). A newline would end the comment and turn
  the rest of the value into shell lines, so control characters are refused everywhere;
- `slurm.extra_sbatch`: long options `--name` or `--name=value` only;
- `slurm.env`: keys are shell identifiers, values single lines exported with `shlex.quote`. Secret
  entries (`is_secret_entry`: a key that looks secret, or a value holding a URL's user info or a
  `?token=`) are never written into a script nor printed: the rank entry
  (`jobs.environments.slurm.rank_main`) sets every `slurm.env` entry in each rank itself, from the run's
  cluster.yaml with secrets.yaml (0600) laid over it, so the ranks still see them, but the batch shell
  and `slurm.setup` lines only see the non-secret ones;
- `slurm.setup`: shell lines by design (module load, venv activation), inserted verbatim, one
  line each, so an entry cannot smuggle in more lines than it shows;
- `slurm.python`, the run name and the run directory: single lines, quoted where they are used.
"""
from __future__ import annotations

import re
import shlex
from typing import Optional

from jobs.schema import ClusterConfig, RecipeConfig, SlurmConfig
from jobs.schema.errors import ConfigError, UsageError
from jobs.schema.secrets import is_secret_entry

# (config key named in errors, sbatch long option, value or None for a flag)
SlurmOption = tuple[str, str, Optional[str]]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LONG_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*")


def source(cluster: ClusterConfig) -> str:
    """How errors name the cluster config (the file's name without .yaml)."""
    return f"cluster config {cluster.name}"


def slurm_section(cluster: ClusterConfig) -> SlurmConfig:
    if cluster.backend != "slurm" or cluster.slurm is None:
        raise UsageError(f"cluster config {cluster.name!r} uses backend {cluster.backend!r}; an sbatch script needs "
                         "a Slurm cluster config", hint="pass --cluster local_slurm or another config with "
                         "backend: slurm")
    return cluster.slurm


def one_line(src: str, key: str, value: str) -> str:
    """A value that must stay on its line: a newline would turn the rest into script lines of its own."""
    if _CONTROL.search(value):
        shown = "the value" if is_secret_entry(key.rsplit(".", 1)[-1], value) else repr(value)  # an error is printed
        raise ConfigError(src, key, f"{shown} contains a newline or another control character",
                          "use a single line of printable characters")
    return value


def job_options(recipe: RecipeConfig, s: SlurmConfig, src: str, job_name: str) -> list[SlurmOption]:
    """The job's name and what it asks of Slurm, in script order: the same options on both paths."""
    return [("run name", "--job-name", one_line("command line", "run name", job_name)),
            *resource_options(recipe, s, src)]


def resource_options(recipe: RecipeConfig, s: SlurmConfig, src: str) -> list[SlurmOption]:
    """What the job asks of Slurm (`--mem` in G on both paths; `extra_sbatch` checked on both)."""
    optional = [("slurm.partition", "--partition", s.partition), ("slurm.account", "--account", s.account),
                ("slurm.qos", "--qos", s.qos)]
    opts = [(key, option, value) for key, option, value in optional if value is not None]
    opts += [("slurm.time_min", "--time", str(s.time_min)),
             ("parallel.nodes", "--nodes", str(recipe.parallel.nodes)),
             ("parallel.procs_per_node", "--ntasks-per-node", str(recipe.parallel.procs_per_node)),
             ("slurm.cpus_per_task", "--cpus-per-task", str(s.cpus_per_task))]
    if s.gpus_per_node > 0:
        opts.append(("slurm.gpus_per_node", "--gpus-per-node", str(s.gpus_per_node)))
    if s.mem_gb is not None:
        opts.append(("slurm.mem_gb", "--mem", f"{s.mem_gb}G"))
    if s.constraint is not None:
        opts.append(("slurm.constraint", "--constraint", s.constraint))
    if s.exclusive:
        opts.append(("slurm.exclusive", "--exclusive", None))
    opts += [_extra_option(src, f"slurm.extra_sbatch[{i}]", entry) for i, entry in enumerate(s.extra_sbatch)]
    for key, _, value in opts:
        if value is not None:
            one_line(src, key, value)
    return opts


def _extra_option(src: str, key: str, entry: str) -> SlurmOption:
    option, eq, value = entry.partition("=")
    if not _LONG_OPTION.fullmatch(option):
        raise ConfigError(src, key, f"{entry!r} is not a long sbatch option",
                          "write it as --option=value or --flag, e.g. --reservation=training")
    return key, option, value if eq else None


def env_exports(src: str, s: SlurmConfig) -> list[str]:
    """`export KEY=value` for every non-secret `slurm.env` entry (secret ones: see the module doc)."""
    checked = [(check_env_entry(src, key, value), value) for key, value in s.env.items()]
    return [f"export {key}={shlex.quote(value)}" for key, value in checked if not is_secret_entry(key, value)]


def check_env_entry(src: str, key: str, value: str) -> str:
    if not _SHELL_NAME.fullmatch(key):
        raise ConfigError(src, f"slurm.env.{key}", f"{key!r} is not a valid environment variable name",
                          "use letters, digits and underscores, not starting with a digit")
    one_line(src, f"slurm.env.{key}", value)
    return key


def setup_lines(src: str, s: SlurmConfig) -> list[str]:
    return [one_line(src, f"slurm.setup[{i}]", line) for i, line in enumerate(s.setup)]


def check_cluster(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    """Every string of the Slurm section that reaches a script, checked before anything is written."""
    s, src = slurm_section(cluster), source(cluster)
    resource_options(recipe, s, src)
    env_exports(src, s)
    setup_lines(src, s)
    if s.python is not None:
        one_line(src, "slurm.python", s.python)
