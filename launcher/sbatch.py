"""Standalone sbatch scripts: `launcher sbatch RECIPE --cluster C` prints a script for plain `sbatch`.

The script runs the same rank entry point as the submitit backend (`python -m jobs.environments.slurm
--run-dir DIR` under srun), so preemption, saving and requeueing behave the same: after a stop
signal rank 0 decides whether to requeue and calls `scontrol requeue` itself; the script forwards
signals, and counts a crash of any rank after srun (below).

Config values never reach the shell unquoted: `launcher.backends.slurm_options` computes and checks them
for both paths (see its docstring). Here a value of a `#SBATCH` line that is not plainly safe is
double-quoted for sbatch's parser; command lines use `shlex.quote`. `slurm.setup` lines run after
the non-secret `slurm.env` entries are exported, in the order the submitit backend uses, so setup
lines may refer to those variables.

If srun fails while nobody told the job to stop (no TERM to this shell), the script runs the rank
entry's `--after-srun` step, which counts the crash of any rank against `slurm.max_failures`.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Optional

from jobs.environments.slurm import ENTRY_MODULE
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
    entry = [python, "-u", "-m", ENTRY_MODULE, "--run-dir", str(run.dir)]
    one_line(src, "slurm.python", python)
    srun = " ".join(shlex.quote(a) for a in ["srun", "--kill-on-bad-exit=1", *entry])
    after = " ".join(shlex.quote(a) for a in [*entry, "--after-srun"])
    lines = ["# -e: a failing setup line stops the job before any rank starts. -u comes after the setup:",
             "# activation scripts often read unset variables.",
             "set -eo pipefail", ""]
    exports = env_exports(src, s)
    if exports:
        lines += ["# slurm.env (secret entries are set by each rank itself, never written here)"] + exports
    setup = setup_lines(src, s)
    if setup:
        lines += ["# slurm.setup: shell lines from the cluster config, inserted verbatim"] + setup + [""]
    return lines + ["set -u", "", *_SIGNALS, srun + " &", *_WAIT, *_after_srun(after)]


# --signal=B: reaches this shell, not the ranks: forward to srun, which forwards to every task.
# A trapped signal interrupts `wait` (status > 128) while srun still runs, so wait again until srun
# has really exited, then exit with its code. Rank 0 requeues the job itself after the save.
_SIGNALS = """\
# --signal=B:USR2 reaches this shell only: forward it (and TERM) to srun, which forwards to every rank.
srun_pid=""
signalled=0
terminated=0
forward() {
    signalled=1
    if [ "$1" = TERM ]; then terminated=1; fi
    if [ -z "$srun_pid" ]; then
        echo "sbatch script: SIG$1 before srun started" >&2
        if [ "$1" = TERM ]; then exit 143; fi
        return 0
    fi
    echo "sbatch script: SIG$1, forwarding to srun (pid $srun_pid)" >&2
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR2' USR2
trap 'forward TERM' TERM
""".splitlines()

_WAIT = """\
srun_pid=$!
while :; do
    signalled=0
    status=0
    wait "$srun_pid" || status=$?
    # a trapped signal makes `wait` return early (status > 128) while srun still runs: wait again
    if [ "$signalled" = 1 ] && [ "$status" -gt 128 ]; then continue; fi
    break
done
echo "sbatch script: srun exited with status $status" >&2
""".splitlines()


def _after_srun(command: str) -> list[str]:
    """A rank crashed (srun failed) and the job was not told to stop: count it, requeue or stop."""
    return ["# srun failed without a TERM to the job (scancel, requeue, time limit): a rank crashed;",
            "# count it against slurm.max_failures, then requeue or stop the run",
            'if [ "$status" -ne 0 ] && [ "$terminated" = 0 ]; then',
            f"    {command} || true",
            "fi",
            'exit "$status"']


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
               state="submitted")
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
