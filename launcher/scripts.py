"""`launcher run SCRIPT`: the recipe a script run is made of.

A script run is a recipe with a `script:` section, so it gets everything a recipe run gets (its
validation, run directory, backends, status, logs, cancel, requeue, checkpoint policy for the
runtime API) without a second code path; the ranks run `jobs.script` instead of the trainer.
Such a recipe can also be written as a file (`script: {path: train.py, args: [...]}`) and launched
with `launcher launch` or `launcher sbatch`.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional, Sequence

from jobs.schema import RecipeConfig, from_document
from jobs.schema.errors import UsageError
from jobs.schema.secrets import redact_args
from jobs.schema.names import MAX_LENGTH


def script_name(script: Optional[str], module: Optional[str]) -> str:
    """The recipe name (and so the default run name's start): `train` for train.py, `train` for -m pkg.train."""
    stem = Path(script).stem if script else (module or "script").rsplit(".", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-_") or "script"
    return name[:MAX_LENGTH - 20]  # room for the default run name's -<hash>


def script_recipe(script: Optional[str], module: Optional[str], script_args: Sequence[str], nodes: int,
                  procs_per_node: int, code_dir: Optional[str], overrides: Sequence[str],
                  resume_args: Optional[str] = None, workdir: Optional[str] = None) -> RecipeConfig:
    """The recipe of `launcher run`: the script, its arguments and the layout; `overrides` may set any
    other recipe key (checkpoint.uri, logging.tracker, ...). A relative script path is the launch
    directory's (made absolute later, with code_dir, by `launcher.preflight.resolve_code`)."""
    where = {"path": str(Path(script).absolute())} if script else {"module": module}
    document = {"name": script_name(script, module),
                "description": f"launcher run {' '.join([script or f'-m {module}', *redact_args(script_args)])}"[:200],
                "script": {**where, "args": list(script_args)},
                "parallel": {"nodes": nodes, "procs_per_node": procs_per_node}}
    if resume_args:  # one string, split as a shell would: --resume-args '--init_from=resume --lr 0.1'
        document["script"]["resume_args"] = _split(resume_args)
    if workdir is not None:
        document["script"]["workdir"] = workdir
    if code_dir is not None:
        document["code_dir"] = code_dir
    return from_document(RecipeConfig, document, "command line", list(overrides))


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:  # an unclosed quote
        shown = " ".join(redact_args(text.split()))  # split at blanks to mask what it can: --token=... in it
        raise UsageError(f"--resume-args {shown!r}: {err}", hint="quote it as the shell would, e.g. "
                         "--resume-args '--init_from=resume'") from None


def restart_hint(recipe: RecipeConfig, backend: str, restarts_runs: bool) -> Optional[str]:
    """One line before a script run starts on a backend that may start it again by itself (a Slurm
    requeue, a VM relaunch: `restarts_runs`) without knowing how to continue: neither resume arguments
    nor the runtime API."""
    script = recipe.script
    if script is None or not restarts_runs or script.resume_args or _uses_runtime_api(script.path):
        return None
    return (f"note: on {backend} a preempted or requeued run starts {script.path or script.module} again; it "
            "continues only if the script resumes by itself. Pass --resume-args with its resume flag (e.g. "
            "--resume-args '--init_from=resume'; {checkpoint_dir} in its arguments is the run's own folder), "
            "or save through the runtime API (jobs.runtime)")


def _uses_runtime_api(path: Optional[str]) -> bool:
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return False
    return "jobs.runtime" in text or "from jobs import runtime" in text
