"""Where a script's start stands: which start of the run this is, whether it continues earlier
progress, and the folders it is given (`launcher run`; the rank wrapper `jobs.script` asks once per rank).

A run starts its script again after a Slurm requeue (the launcher's, an admin's, a node failure), a VM
relaunch, a SkyPilot recovery or a relaunch of the same run name. A plain script cannot tell a first
start from a restart, so every rank is told, in its environment:

    LAUNCHER_RUN_DIR         the run directory
    LAUNCHER_CHECKPOINT_DIR  <run>/script_checkpoints: the script's own, kept across every start
    LAUNCHER_WORK_DIR        the script's working directory (<run>/work, or the code folder)
    LAUNCHER_ATTEMPT         1 on the run's first start, then 2, 3, ... (launches, requeues, restarts)
    LAUNCHER_RESUMING        1 when this start continues earlier progress, else 0

and on a start that continues earlier progress the recipe's `script.resume_args` are appended to its
arguments (nanoGPT's `--init_from=resume`). "Earlier progress" is what a script leaves on disk: a file
in its checkpoint folder, in its run working directory, or a committed runtime-API checkpoint. A start
is identified by the launch count, the Slurm job and restart count, and torchrun's rendezvous id; the
first rank to begin it decides for all (under run.json's lock), so every rank gets the same answer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jobs.schema import RecipeConfig
from jobs.schema.run_dir import (CHECKPOINTS, REQUEUE_ASKED, SCRIPT_CHECKPOINTS, SCRIPT_WORKDIR, Run, RunInfo,
                                 committed_steps)
from jobs.schema.script import fill
from jobs.schema.secrets import redact_args

RUN_DIR_VAR = "LAUNCHER_RUN_DIR"  # how the runtime API inside the script finds its run
CHECKPOINT_DIR_VAR, WORK_DIR_VAR = "LAUNCHER_CHECKPOINT_DIR", "LAUNCHER_WORK_DIR"
ATTEMPT_VAR, RESUMING_VAR = "LAUNCHER_ATTEMPT", "LAUNCHER_RESUMING"
RESTART_VAR = "LAUNCHER_RESTART"  # the supervisor's restart inside the allocation (jobs.watchdog): a new start
FIX = "pass --resume-args with the flag that makes the script resume (recipe key script.resume_args), " \
      "or save through the runtime API (jobs.runtime)"


@dataclass(frozen=True)
class Start:
    """One start of a script run, the same on every rank."""

    attempt: int
    resuming: bool
    checkpoint_dir: Path
    workdir: Path
    note: Optional[str] = None  # a restart that probably began from scratch, or found nothing to resume

    def environment(self, run: Run) -> dict[str, str]:
        return {RUN_DIR_VAR: str(run.dir), CHECKPOINT_DIR_VAR: str(self.checkpoint_dir),
                WORK_DIR_VAR: str(self.workdir), ATTEMPT_VAR: str(self.attempt),
                RESUMING_VAR: "1" if self.resuming else "0"}

    def arguments(self, run: Run, recipe: RecipeConfig) -> list[str]:
        """The script's arguments for this start: its own, then its resume arguments when resuming,
        with `{run_dir}` and `{checkpoint_dir}` filled in."""
        script = recipe.script
        assert script is not None, "a script start needs a recipe with a script: section"
        folders = {"{run_dir}": str(run.dir), "{checkpoint_dir}": str(self.checkpoint_dir)}
        return [fill(a, folders) for a in (*script.args, *(script.resume_args if self.resuming else ()))]

    def described(self, recipe: RecipeConfig) -> str:
        """One line for the rank's log: which start, and what was added for it."""
        script = recipe.script
        if self.attempt == 1:
            return "start 1 of the run"
        if self.resuming and script and script.resume_args:
            return f"start {self.attempt}: continues earlier progress, with {' '.join(redact_args(script.resume_args))}"
        return f"start {self.attempt}: continues earlier progress" if self.resuming else \
            f"start {self.attempt}: no earlier progress found"


def begin(run: Run, recipe: RecipeConfig, code_dir: Path) -> Start:
    """This start, decided by the first rank to begin it and read by the others; its folders made."""
    script = recipe.script
    assert script is not None, "a script start needs a recipe with a script: section"
    checkpoint_dir = run.dir / SCRIPT_CHECKPOINTS
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    workdir = code_dir
    if script.workdir == "run":
        workdir = run.dir / SCRIPT_WORKDIR
        link_code(workdir, code_dir, run.dir)
    key = start_key(run.info())

    def decide(info: RunInfo) -> dict[str, Any]:
        if info.attempt_key == key:  # another rank of this start decided already
            return {}
        attempt = (info.attempt or 0) + 1
        resuming = attempt > 1 and made_progress(run, checkpoint_dir, workdir if script.workdir == "run" else None)
        # the runtime API, or a framework that asked for its own requeue (Lightning's SLURMEnvironment:
        # jobs.environments.slurm_requeue), which resumes by itself from what it saved (its hpc checkpoint)
        resumes_itself = bool(info.runtime_api) or (run.dir / REQUEUE_ASKED).is_dir()
        return {"attempt": attempt, "attempt_key": key, "resuming": resuming,
                "restart_note": _note(attempt, resuming, bool(script.resume_args), resumes_itself)}

    info = run.change(decide)
    return Start(info.attempt or 1, bool(info.resuming), checkpoint_dir, workdir, info.restart_note)


def start_key(info: RunInfo) -> str:
    """What tells this start from the last one: a launch, a Slurm job's restart, a torchrun rendezvous, a
    restart by the supervisor (one rank has no torchrun, so no new rendezvous id)."""
    env = os.environ
    return (f"launch {info.launches} slurm {env.get('SLURM_JOB_ID', '-')}.{env.get('SLURM_RESTART_COUNT', '0')} "
            f"rdzv {env.get('TORCHELASTIC_RUN_ID', '-')} restart {env.get(RESTART_VAR, '0')}")


def made_progress(run: Run, checkpoint_dir: Path, workdir: Optional[Path]) -> bool:
    """Whether earlier starts left anything to continue from: a file in the script's checkpoint folder or
    in its run working directory (not the links to the code), or a committed runtime-API checkpoint."""
    return (_holds_a_file(checkpoint_dir) or (workdir is not None and _holds_a_file(workdir, skip_links=True))
            or bool(committed_steps(run.dir / CHECKPOINTS)))


def _holds_a_file(folder: Path, skip_links: bool = False) -> bool:
    for root, dirs, files in os.walk(folder):  # os.walk does not follow links into the code folder
        if skip_links and Path(root) == folder:
            files = [f for f in files if not (folder / f).is_symlink()]
        if files:
            return True
    return False


def _note(attempt: int, resuming: bool, has_resume_args: bool, resumes_itself: bool) -> Optional[str]:
    if attempt == 1 or resumes_itself:
        return None
    if not has_resume_args:
        return (f"start {attempt}: the script uses neither --resume-args nor the runtime API; unless it resumes "
                f"from its own files, it began again from scratch (fix: {FIX})")
    if not resuming:
        return (f"start {attempt}: nothing from earlier starts in script_checkpoints/ or work/, so the resume "
                "arguments were not added (save into {checkpoint_dir} so that they are)")
    return None


def link_code(workdir: Path, code_dir: Path, run_dir: Path) -> None:
    """`workdir` as the script's working directory: a link to each entry of the code folder, so that relative
    reads (a data folder, a config file) find the code's files, while every new file lands in the run. An
    entry the script made itself in `workdir` wins over the code's of the same name. Every rank may call
    this at once: each step is atomic, a link that already exists is left alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    for entry in code_dir.iterdir():
        if run_dir.is_relative_to(entry):  # the runs directory inside the code folder: not the script's
            continue
        link = workdir / entry.name
        if link.is_symlink() and os.readlink(link) != str(entry):  # an older code folder's: point it here
            tmp = workdir / f".{entry.name}.{os.getpid()}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(entry)
            tmp.replace(link)
        elif not os.path.lexists(link):
            try:
                link.symlink_to(entry)
            except FileExistsError:  # another rank was first
                pass
    for link in workdir.iterdir():  # our links (to an entry of the same name) to what the code folder lacks
        target = Path(os.readlink(link)) if link.is_symlink() else None
        if target and target.name == link.name and (target.parent != code_dir or not os.path.lexists(target)):
            link.unlink(missing_ok=True)
