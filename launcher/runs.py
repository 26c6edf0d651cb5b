"""Run directories: one per run name, found again by a relaunch so the run resumes its own state.

    <runs_dir>/<run_name>/
        run.json        names, tracking id, backend, job ids, pids   run.json.lock  serialises updates
        config.yaml     resolved recipe      cluster.yaml  resolved cluster config (both with secrets masked)
        secrets.yaml    the masked values, mode 0600 (only when there are any; see schema.secrets)
        logs/rankN.log  metrics.jsonl  result.json  checkpoints/ (local copies)
        failures/       one file per rank that raised, read after srun to count a failure (Slurm)

Several processes write run.json (the launcher, rank 0, `launcher cancel`), so every update is a
read-modify-write under an exclusive lock, written to a unique temporary file and renamed over it:
a reader never sees half a file and no update is lost. Readers take no lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from schema import secrets
from schema import ClusterConfig, RecipeConfig, config_hash, to_dict
from schema.errors import UsageError
from schema.names import check_name

# Fields other code relies on, with their JSON type: a file where one has another type is unreadable,
# so that no caller meets a string where it expects a pid.
INFO_TYPES: dict[str, type] = {
    "run_name": str, "run_id": str, "backend": str, "launches": int, "pid": int, "pid_start": int,
    "launcher_pid": int, "launcher_start": int, "job_id": str, "job_ids": list, "state": str,
}
RESULT_TYPES: dict[str, type] = {"outcome": str, "step": int}


def read_object(path: Path, types: dict[str, type]) -> tuple[dict[str, Any], str]:
    """The JSON object in `path` ({} if there is no file) and "", or {} and why it cannot be used."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return {}, ""
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or not UTF-8 (a partial write)
        return {}, str(err)
    if not isinstance(data, dict):
        return {}, f"a JSON {type(data).__name__}, not an object"
    for key, kind in types.items():
        # bool is an int to Python, never a pid or a step
        if key in data and data[key] is not None and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            return {}, f"{key!r} is {data[key]!r:.40}, not a {kind.__name__}"
    return data, ""


@dataclass(frozen=True)
class Run:
    name: str
    dir: Path

    @property
    def info_path(self) -> Path:
        return self.dir / "run.json"

    def info(self) -> dict[str, Any]:
        """run.json; {} while there is none or it cannot be read (`problems()` says why)."""
        return read_object(self.info_path, INFO_TYPES)[0]

    def result(self) -> dict[str, Any]:
        """What the trainer wrote at the end of the last launch: {} while running, after a crash, or
        while the file cannot be read (`problems()` says why)."""
        return read_object(self.dir / "result.json", RESULT_TYPES)[0]

    def problems(self) -> list[str]:
        """Why run.json or result.json cannot be read, for `status` to show instead of a traceback."""
        found = [(self.info_path, read_object(self.info_path, INFO_TYPES)[1]),
                 (self.dir / "result.json", read_object(self.dir / "result.json", RESULT_TYPES)[1])]
        return [f"{path.name} unreadable: {why}" for path, why in found if why]

    def update(self, *, remove: Iterable[str] = (), **fields: Any) -> None:
        """Set `fields` and delete the keys in `remove`, as one atomic change to run.json."""
        with self._locked():
            info = self.readable_info()
            for key in remove:
                info.pop(key, None)
            self._write_info({**info, **fields})

    def readable_info(self) -> dict[str, Any]:
        """run.json for a writer: a UsageError naming the file if it exists but cannot be read."""
        info, problem = read_object(self.info_path, INFO_TYPES)
        if problem:  # writing over it would lose the run id and job ids it may still hold
            raise UsageError(f"{self.info_path}: unreadable: {problem}", hint=f"repair or delete this file "
                             f"(deleting it gives run {self.name} a new tracker run id)")
        return info

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / "run.json.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _mode(self) -> int:
        """The permissions run.json has (0644 for a new one: mkstemp's 0600 would hide status from others)."""
        try:
            return self.info_path.stat().st_mode & 0o777
        except FileNotFoundError:
            return 0o644

    def _write_info(self, info: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".run.json.", suffix=".tmp")  # unique per writer
        try:
            os.fchmod(fd, self._mode())
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, self.info_path)  # atomic: a reader never sees half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
        raise UsageError(f"{where}: {override or cluster.runs_dir!r:.300} cannot be used: {_why(err)}") from None
    if is_file:
        raise UsageError(f"{where}: {root} is a file, not a directory", hint=f"choose a directory for the runs")
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
        raise UsageError(f"{str(path)!r:.300}: cannot be used as a run directory: {_why(err)}") from None
    if not inside:
        raise UsageError(f"{str(path)!r:.300} resolves to {str(path.resolve())!r:.300}, outside the runs directory "
                         f"{root}", hint=f"choose another --run-name (a run directory cannot be a link elsewhere)")
    return Run(name, path)


def find_run(name: str, root: Path) -> Run:
    run = run_at(root, name)
    if not run.info_path.exists():
        known = sorted(p.name for p in root.glob("*/run.json")) if root.exists() else []
        names = ", ".join(p.split("/")[0] for p in known) or "none"
        raise UsageError(f"{root / name}: no such run (runs in {root}: {names})")
    return run


def checkpoint_uri(recipe: RecipeConfig, run_name: str) -> Optional[str]:
    """The run's own folder under `checkpoint.uri`, or None: local checkpoints only."""
    uri = recipe.checkpoint.uri
    return f"{uri.rstrip('/')}/{run_name}" if uri else None


def _shown(uri: Optional[str]) -> Optional[str]:
    return secrets.redact_text(uri) if uri else None


def prepare_run(recipe: RecipeConfig, cluster: ClusterConfig, name: str, root: Path, resume: str,
                run_id: Optional[str] = None) -> Run:
    """The run directory, created or updated for this launch; a new run takes `run_id` if given."""
    run = run_at(root, name)
    previous = run.readable_info()
    if previous and resume == "never" and any((run.dir / "checkpoints").glob("step-*")):
        raise UsageError(f"run {name!r} already has checkpoints in {run.dir / 'checkpoints'}; "
                         "pass --resume auto to continue it, or choose another --run-name")
    if run_id and not previous.get("run_id"):  # `--run-id`: a new directory continues that run
        previous = {**previous, "run_id": run_id}
    created = not run.dir.exists()
    try:
        _write_run_files(run, recipe, cluster, previous, resume)
    except OSError as err:  # no space, no permission, a name too long for the file system, ...
        if created:  # nothing half-made stays behind
            shutil.rmtree(run.dir, ignore_errors=True)
        raise UsageError(f"cannot write run directory {str(run.dir)!r:.300}: {_why(err)}"
                         f"{f' ({err.filename!r:.300})' if err.filename else ''}") from None
    return run


def _write_run_files(run: Run, recipe: RecipeConfig, cluster: ClusterConfig, previous: dict[str, Any],
                     resume: str) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "result.json").unlink(missing_ok=True)  # belongs to the previous launch
    secrets.write_configs(run.dir, {"config.yaml": to_dict(recipe), "cluster.yaml": to_dict(cluster)})
    run.update(
        run_name=run.name,
        run_id=previous.get("run_id") or uuid.uuid4().hex[:12],  # the tracker's run id: kept across relaunches
        recipe=recipe.name,
        cluster=cluster.name,
        backend=cluster.backend,
        resume=resume,
        checkpoint_uri=_shown(checkpoint_uri(recipe, run.name)),  # for people; ranks derive it from the recipe
        config_hash=config_hash(recipe),
        created=previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        launches=previous.get("launches", 0) + 1,
    )
