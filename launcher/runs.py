"""Run directories on the launching side: names, where they live, and creating one for a launch.

The layout and the typed records (run.json, result.json) are in jobs/schema/run_dir.py, shared with the ranks.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from jobs.schema import ClusterConfig, RecipeConfig, config_hash, secrets
from jobs.schema.errors import UsageError, short_path
from jobs.schema.names import check_name
from jobs.schema.run_dir import (CHECKPOINTS, RESULT_JSON, RUN_JSON, SCRIPT_CHECKPOINTS, Run, RunInfo, checkpoint_uri,
                                 committed_steps)


def default_run_name(recipe: RecipeConfig) -> str:
    """Recipe name plus a hash of the resolved config: the same command finds the same run again,
    while changed overrides start a new one."""
    return f"{recipe.name}-{config_hash(recipe)[:8]}"


def runs_root(cluster: ClusterConfig, override: Optional[str]) -> Path:
    where = "--runs-dir" if override else f"cluster config {cluster.name!r}: runs_dir"
    try:
        root = Path(override or cluster.runs_dir).expanduser().resolve()
        is_file = _exists(root) and not root.is_dir()
    except (OSError, RuntimeError, ValueError) as err:  # a name too long, a symlink loop, a NUL byte
        raise UsageError(f"{where}: {short_path(override or cluster.runs_dir, 300)} cannot be used: "
                         f"{_why(err)}") from None
    if is_file:
        raise UsageError(f"{where}: {root} is a file, not a directory", hint="choose a directory for the runs")
    return root


def _exists(path: Path) -> bool:
    """Path.exists() that raises on what makes a path unusable (too long, a loop) instead of saying False."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _why(err: BaseException) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def run_at(root: Path, name: str) -> Run:
    """The run `name` in `root`; its directory must resolve to a direct child of `root`, so that no
    name (`..`, an absolute path) and no symlink puts a run's files elsewhere."""
    path = root / check_name("run name", name)
    try:
        inside = path.resolve().parent == root.resolve()
        _exists(path)
    except (OSError, RuntimeError, ValueError) as err:  # a name too long, a symlink loop, a NUL byte
        raise UsageError(f"{short_path(path, 300)}: cannot be used as a run directory: {_why(err)}") from None
    if not inside:
        raise UsageError(f"{short_path(path, 300)} resolves to {short_path(path.resolve(), 300)}, outside the runs "
                         f"directory {root}", hint="choose another --run-name (a run directory cannot be a link elsewhere)")
    return Run.at(path)


def code_dir_of(recipe: RecipeConfig) -> Path:
    """The user's code directory: the recipe's code_dir (relative to the launch directory, `~` is the home
    directory, as for runs_dir) or the launch directory."""
    return (Path.cwd() / Path(recipe.code_dir or ".").expanduser()).resolve()


def find_run(name: str, root: Path) -> Run:
    run = run_at(root, name)
    if not run.info_path.exists():
        known = sorted(p.parent.name for p in root.glob(f"*/{RUN_JSON}")) if root.exists() else []
        names = ", ".join(known) or "none"
        raise UsageError(f"{root / name}: no such run (runs in {root}: {names})")
    return run


def _files(folder: Path) -> bool:
    """Whether a script left anything in `folder` (its own checkpoints)."""
    return folder.is_dir() and any(files for _, _, files in os.walk(folder))


def _shown(uri: Optional[str]) -> Optional[str]:
    return secrets.redact_text(uri) if uri else None


def prepare_run(recipe: RecipeConfig, cluster: ClusterConfig, name: str, root: Path, resume: str,
                run_id: Optional[str] = None) -> Run:
    """The run directory, created or updated for this launch; a new run takes `run_id` if given."""
    run = run_at(root, name)
    previous = run.readable_info()
    if previous and resume == "never":
        for folder, found in ((run.dir / CHECKPOINTS, committed_steps(run.dir / CHECKPOINTS)),
                              (run.dir / SCRIPT_CHECKPOINTS, _files(run.dir / SCRIPT_CHECKPOINTS))):
            if found:
                raise UsageError(f"run {name!r} already has checkpoints in {folder}; pass --resume auto to "
                                 "continue it, or choose another --run-name")
    if run_id and not previous.run_id:  # `--run-id`: a new directory continues that run
        previous = dataclasses.replace(previous, run_id=run_id)
    created = not run.dir.exists()
    try:
        _write_run_files(run, recipe, cluster, previous, resume)
    except OSError as err:  # no space, no permission, a name too long for the file system, ...
        if created:  # nothing half-made stays behind
            shutil.rmtree(run.dir, ignore_errors=True)
        raise UsageError(f"cannot write run directory {short_path(run.dir, 300)}: {_why(err)}"
                         f"{f' ({short_path(err.filename, 300)})' if err.filename else ''}") from None
    return run


def _write_run_files(run: Run, recipe: RecipeConfig, cluster: ClusterConfig, previous: RunInfo,
                     resume: str) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / RESULT_JSON).unlink(missing_ok=True)  # belongs to the previous launch
    run.write_configs(recipe, cluster)
    run.update(
        remove=("exit_code", "failed_rank"),  # the previous launch's
        run_name=run.name,
        run_id=previous.run_id or uuid.uuid4().hex[:12],  # the tracker's run id: kept across relaunches
        recipe=recipe.name,
        cluster=cluster.name,
        backend=cluster.backend,
        resume=resume,
        checkpoint_uri=_shown(checkpoint_uri(recipe, run.name)),  # for people; ranks derive it from the recipe
        config_hash=config_hash(recipe),
        code_dir=str(code_dir_of(recipe)),  # user code is found here on every rank (first on the path)
        created=previous.created or time.strftime("%Y-%m-%dT%H:%M:%S"),
        launches=previous.launches + 1,
    )
