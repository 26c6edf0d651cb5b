"""Standalone sbatch scripts: `launcher sbatch RECIPE --cluster C` prints a script for plain `sbatch`.

The script runs the same rank entry point as the submitit backend (`python -m launcher.backends.slurm
--run-dir DIR` under srun), so preemption, saving and requeueing behave the same: rank 0 decides
whether to requeue and calls `scontrol requeue` itself; the script only forwards signals.

Config values never reach the shell unquoted:
- `#SBATCH` lines are bash comments, but sbatch parses them with its own rules (whitespace splits
  arguments, `#` starts a comment, double quotes and backslashes quote). A value that is not plainly
  safe is double-quoted for that parser; a value with a newline or another control character is
  refused, since it would end the comment and turn the rest of the value into shell code.
- Command lines and `export KEY=value` use `shlex.quote`; env keys must be shell identifiers.
- `slurm.setup` lines are shell commands by design (module load, venv activation) and are inserted
  verbatim; each must be a single line, so one entry cannot smuggle in more lines than it shows.
  They run after `slurm.env` is exported, in the order the submitit backend uses, so setup lines
  may refer to those variables.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from launcher import backends
from launcher.config import ClusterConfig, RecipeConfig, SlurmConfig, load_cluster, load_recipe
from launcher.errors import ConfigError, UsageError
from launcher.names import check_name
from launcher.runs import Run, default_run_name, prepare_run, run_at, runs_root

SCRIPT_NAME = "sbatch.sh"  # written into the run directory next to run.json
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./|&*!?<>()\[\]{}^~-]*")  # needs no quoting for sbatch's parser
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LONG_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*")


# ----------------------------------------------------------------------------- rendering
def render_sbatch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, python: str) -> str:
    """The whole script: #SBATCH header, environment, setup, then srun in the background."""
    s = _slurm_section(cluster)
    src = f"cluster config {cluster.name}"
    _one_line("command line", "run name", run.name)
    _one_line("command line", "run directory (--runs-dir, --run-name)", str(run.dir))
    header = ["#!/bin/bash",
              f"# {run.name}: recipe "
              f"{_one_line(f'recipe {recipe.name!r}', 'name', recipe.name)} on cluster "
              f"{_one_line(src, 'name', cluster.name)}, written by `launcher sbatch`.",
              "# Submit with plain `sbatch THIS_FILE`; `launcher status/logs/cancel RUN` follow it."]
    directives = [_directive(src, key, option, value) for key, option, value in sbatch_options(recipe, s, run, src)]
    return "\n".join(header + directives + [""] + _body(src, s, run, python)) + "\n"


def sbatch_options(recipe: RecipeConfig, s: SlurmConfig, run: Run, src: str) -> list[tuple[str, str, Optional[str]]]:
    """(config key for error messages, sbatch option, value or None for a flag), in script order."""
    optional = [("slurm.partition", "--partition", s.partition), ("slurm.account", "--account", s.account),
                ("slurm.qos", "--qos", s.qos)]
    opts: list[tuple[str, str, Optional[str]]] = [("run name", "--job-name", run.name)]
    opts += [(key, option, value) for key, option, value in optional if value is not None]
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
    # B: the batch shell only; its trap forwards to srun, so the ranks see USR2 exactly once
    opts += [("slurm.grace_period_s", "--signal", f"B:USR2@{s.grace_period_s}"),
             ("", "--requeue", None),
             ("", "--open-mode", "append"),  # a requeued job appends to the same slurm-<id>.out
             ("run directory", "--output", f"{_output_pattern(run.dir)}/slurm-%j.out")]
    return opts


def _body(src: str, s: SlurmConfig, run: Run, python: str) -> list[str]:
    srun = ["srun", "--kill-on-bad-exit=1", python, "-u", "-m", "launcher.backends.slurm", "--run-dir", str(run.dir)]
    _one_line(src, "slurm.python", python)
    lines = ["# -e: a failing setup line stops the job before any rank starts. -u comes after the setup:",
             "# activation scripts often read unset variables.",
             "set -eo pipefail", ""]
    if s.env:
        lines += ["# slurm.env"] + [_export(src, key, value) for key, value in s.env.items()]
    if s.setup:
        lines += ["# slurm.setup: shell lines from the cluster config, inserted verbatim"]
        lines += [_one_line(src, f"slurm.setup[{i}]", line) for i, line in enumerate(s.setup)] + [""]
    return lines + ["set -u", "", *_SIGNALS, " ".join(shlex.quote(a) for a in srun) + " &", *_WAIT]


# --signal=B: reaches this shell, not the ranks: forward to srun, which forwards to every task.
# A trapped signal interrupts `wait` (status > 128) while srun still runs, so wait again until srun
# has really exited, then exit with its code. Rank 0 requeues the job itself after the save.
_SIGNALS = """\
# --signal=B:USR2 reaches this shell only: forward it (and TERM) to srun, which forwards to every rank.
srun_pid=""
signalled=0
forward() {
    signalled=1
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
exit "$status"
""".splitlines()


# ----------------------------------------------------------------------------- quoting and checks
def _slurm_section(cluster: ClusterConfig) -> SlurmConfig:
    if cluster.backend != "slurm" or cluster.slurm is None:
        raise UsageError(f"cluster config {cluster.name!r} uses backend {cluster.backend!r}; an sbatch script needs "
                         "a Slurm cluster config\n  HINT: pass --cluster local_slurm or another config with "
                         "backend: slurm")
    return cluster.slurm


def _one_line(src: str, key: str, value: str) -> str:
    """A value that must stay on its line: a newline would turn the rest into script lines of its own."""
    if _CONTROL.search(value):
        raise ConfigError(src, key, f"{value!r} contains a newline or another control character",
                          "use a single line of printable characters")
    return value


def _sbatch_value(src: str, key: str, value: str) -> str:
    """Quote for sbatch's #SBATCH parser (not bash: the line is a comment to bash)."""
    _one_line(src, key, value)
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directive(src: str, key: str, option: str, value: Optional[str]) -> str:
    return f"#SBATCH {option}" if value is None else f"#SBATCH {option}={_sbatch_value(src, key, value)}"


def _extra_option(src: str, key: str, entry: str) -> tuple[str, str, Optional[str]]:
    option, eq, value = entry.partition("=")
    if not _LONG_OPTION.fullmatch(option):
        raise ConfigError(src, key, f"{entry!r} is not a long sbatch option",
                          "write it as --option=value or --flag, e.g. --reservation=training")
    return key, option, value if eq else None


def _output_pattern(run_dir: Path) -> str:
    """The run directory inside --output, where sbatch expands %-patterns: keep a literal % literal."""
    if "\\" in str(run_dir):
        raise UsageError(f"run directory {str(run_dir)!r} contains a backslash, which turns off sbatch's "
                         "%j expansion in --output\n  HINT: choose a run name and runs directory without '\\'")
    return str(run_dir).replace("%", "%%")


def _export(src: str, key: str, value: str) -> str:
    if not _SHELL_NAME.fullmatch(key):
        raise ConfigError(src, f"slurm.env.{key}", f"{key!r} is not a valid environment variable name",
                          "use letters, digits and underscores, not starting with a digit")
    return f"export {key}={shlex.quote(_one_line(src, f'slurm.env.{key}', value))}"


# ----------------------------------------------------------------------------- submitting
def submit(run: Run, script: Path) -> str:
    """`sbatch` the script; record the job id in run.json like the submitit backend does."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused {script} (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    run.update(job_id=job_id, job_ids=run.info().get("job_ids", []) + [job_id], sbatch_script=str(script),
               state="submitted")
    return job_id


def cmd_sbatch(args: argparse.Namespace) -> int:
    """`launcher sbatch`: validate like `launch`, prepare the run directory, print (and maybe submit) the script."""
    recipe = load_recipe(args.recipe, args.overrides)
    cluster = load_cluster(args.cluster)
    cluster.check_recipe(recipe, f"cluster config {args.cluster}")
    slurm = _slurm_section(cluster)
    if args.submit:
        backends.get(cluster).check(recipe, cluster)  # sbatch on PATH
    name = args.run_name or check_name("default run name", default_run_name(recipe))
    root = runs_root(cluster, args.runs_dir)
    # rendered once before the directory exists, so a refused value leaves nothing behind
    render_sbatch(recipe, cluster, Run(name, root / name), slurm.python or sys.executable)
    backends.refuse_if_running(run_at(root, name))  # a live job would read the rewritten config.yaml
    run = prepare_run(recipe, cluster, name, root, args.resume)
    script = render_sbatch(recipe, cluster, run, slurm.python or sys.executable)
    path = run.dir / SCRIPT_NAME
    path.write_text(script)
    sys.stdout.write(script)
    sys.stdout.flush()
    print(f"# run {name}: {run.dir}; script written to {path}", file=sys.stderr, flush=True)
    if args.submit:
        job_id = submit(run, path)
        print(f"submitted Slurm job {job_id} for run {name} (logs: launcher logs {name})", file=sys.stderr, flush=True)
    return 0
