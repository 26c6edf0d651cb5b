"""Standalone sbatch scripts: `launcher sbatch RECIPE --cluster C` prints a script for plain `sbatch`.

The script ends in the same batch step as the submitit backend's (`jobs.environments.slurm_supervise`, which
replaces the shell and runs `python -m jobs.environments.slurm --run-dir DIR` under srun), so preemption,
saving, requeueing, hangs and restarts inside the allocation behave the same: after a stop signal rank 0
decides whether to requeue and calls `scontrol requeue` itself; the supervisor forwards signals, restarts
the ranks in place after a hang or a crash while the recipe's budgets allow, and otherwise counts a crash
against `slurm.max_failures`.

Config values never reach the shell unquoted: `launcher.backends.slurm_options` computes and checks them
for both paths (see its docstring). Here a value of a `#SBATCH` line that is not plainly safe is
double-quoted for sbatch's parser; command lines use `shlex.quote`. `slurm.setup` lines run after
the non-secret `slurm.env` entries are exported, in the order the submitit backend uses, so setup
lines may refer to those variables.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Optional

from jobs.environments.slurm import SUPERVISOR
from launcher.backends.slurm_options import SlurmOption, env_exports, job_options, one_line, setup_lines, \
    slurm_section, source
from jobs.schema.run_dir import Run
from jobs.schema import ClusterConfig, RecipeConfig, SlurmConfig
from jobs.schema.errors import UsageError

SCRIPT_NAME = "sbatch.sh"  # written into the run directory next to run.json
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./|&*!?<>()\[\]{}^~-]*")  # needs no quoting for sbatch's parser


# ----------------------------------------------------------------------------- rendering
def render_sbatch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, python: str) -> str:
    """The whole script: #SBATCH header, environment, setup, then srun in the background."""
    s, src = slurm_section(cluster), source(cluster)
    one_line("command line", "run name", run.name)
    one_line("command line", "run directory (--runs-dir, --run-name)", str(run.dir))
    header = ["#!/bin/bash",
              f"# {run.name}: recipe "
              f"{one_line(f'recipe {recipe.name!r}', 'name', recipe.name)} on cluster "
              f"{one_line(src, 'name', cluster.name)}, written by `launcher sbatch`.",
              "# Submit with plain `sbatch THIS_FILE`; `launcher status/logs/cancel RUN` follow it."]
    directives = [_directive(src, key, option, value) for key, option, value in sbatch_options(recipe, s, run, src)]
    return "\n".join(header + directives + [""] + _body(src, s, run, python)) + "\n"


def sbatch_options(recipe: RecipeConfig, s: SlurmConfig, run: Run, src: str) -> list[SlurmOption]:
    """(config key for error messages, sbatch option, value or None for a flag), in script order."""
    opts = job_options(recipe, s, src, run.name)
    # B: the batch shell only; its trap forwards to srun, so the ranks see USR2 exactly once
    opts += [("slurm.grace_period_s", "--signal", f"B:USR2@{s.grace_period_s}"),
             ("", "--requeue", None),
             ("", "--open-mode", "append"),  # a requeued job appends to the same slurm-<id>.out
             ("run directory", "--output", f"{_output_pattern(run.dir)}/slurm-%j.out")]
    return opts


def _body(src: str, s: SlurmConfig, run: Run, python: str) -> list[str]:
    one_line(src, "slurm.python", python)
    supervisor = " ".join(shlex.quote(a) for a in [python, "-u", "-m", SUPERVISOR, "--run-dir", str(run.dir),
                                                   "--forward-notices"])
    lines = ["# -e: a failing setup line stops the job before any rank starts. -u comes after the setup:",
             "# activation scripts often read unset variables.",
             "set -eo pipefail", "",
             "# a notice (--signal=B:USR2) before the ranks start must not kill this shell",
             """trap 'echo "sbatch script: SIGUSR2 before the ranks started" >&2' USR2""", ""]
    exports = env_exports(src, s)
    if exports:
        lines += ["# slurm.env (secret entries are set by each rank itself, never written here)"] + exports
    setup = setup_lines(src, s)
    if setup:
        lines += ["# slurm.setup: shell lines from the cluster config, inserted verbatim"] + setup + [""]
    return lines + ["set -u", "", *HAND_OVER, f"exec {supervisor}"]


# The supervisor replaces this shell (exec), so Slurm's signals to the batch shell reach it: it forwards
# notices and TERM to srun, watches for hangs and restarts the ranks in place (slurm_supervise).
HAND_OVER = ["# srun, the hang watchdog and restarts inside the allocation: jobs.environments.slurm_supervise,",
             "# which replaces this shell and forwards its signals to srun. A notice in the moment between",
             "# here and its own handlers is ignored, not fatal.",
             "trap '' USR1 USR2"]


# ----------------------------------------------------------------------------- quoting and checks
def _sbatch_value(src: str, key: str, value: str) -> str:
    """Quote for sbatch's #SBATCH parser (not bash: the line is a comment to bash)."""
    one_line(src, key, value)
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directive(src: str, key: str, option: str, value: Optional[str]) -> str:
    return f"#SBATCH {option}" if value is None else f"#SBATCH {option}={_sbatch_value(src, key, value)}"


def _output_pattern(run_dir: Path) -> str:
    """The run directory inside --output, where sbatch expands %-patterns: keep a literal % literal."""
    if "\\" in str(run_dir):
        raise UsageError(f"run directory {str(run_dir)!r} contains a backslash, which turns off sbatch's "
                         "%j expansion in --output", hint="choose a run name and runs directory without '\\'")
    return str(run_dir).replace("%", "%%")


# ----------------------------------------------------------------------------- submitting
def submit(run: Run, script: Path) -> str:
    """`sbatch` the script; record the job id in run.json like the submitit backend does."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused {script} (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    run.update(job_id=job_id, job_ids=run.info().job_ids + [job_id], sbatch_script=str(script),
               state="submitted", remove=("inplace_restarts", "inplace_stop"))  # each launch: whole budgets
    return job_id


# ----------------------------------------------------------------------------- a Bayesian sweep's workers
def render_worker_array(recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, workers: int,
                        python: str) -> str:
    """A job array of `workers` elements, each a sweep worker (`launcher.sweeps.worker`) that runs trials
    one after another in its allocation (every trial has the same resources: `recipe`'s). The worker
    replaces the batch shell (exec), so `--signal=B:USR2` reaches it; it forwards the signal to the
    trial's srun, rank 0 requeues the element, and the requeued worker resumes the same trial."""
    s, src = slurm_section(cluster), source(cluster)
    one_line("command line", "sweep folder (--runs-dir, --name)", str(folder))
    opts = job_options(recipe, s, src, folder.name)
    opts += [("--workers", "--array", f"0-{workers - 1}"),
             ("slurm.grace_period_s", "--signal", f"B:USR2@{s.grace_period_s}"),
             ("", "--requeue", None),
             ("", "--open-mode", "append"),
             ("sweep folder", "--output", f"{_output_pattern(folder)}/worker-%A_%a.out")]
    header = ["#!/bin/bash", f"# {folder.name}: Bayesian sweep workers on cluster {one_line(src, 'name', cluster.name)}, "
              "written by `launcher sweep --search bayes`."]
    entry = " ".join(shlex.quote(a) for a in [one_line(src, "slurm.python", python), "-u", "-m",
                                              "launcher.sweeps.worker", "--sweep-dir", str(folder)])
    body = ["set -eo pipefail"] + env_exports(src, s) + setup_lines(src, s) + [
        "set -u", f'exec {entry} --worker "$SLURM_ARRAY_TASK_ID"']
    directives = [_directive(src, key, option, value) for key, option, value in opts]
    return "\n".join(header + directives + [""] + body) + "\n"
