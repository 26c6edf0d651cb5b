"""Run directories: one per run name, found again by a relaunch so the run resumes its own state.

    <runs_dir>/<run_name>/
        run.json        names, tracking id, backend, job ids
        config.yaml     resolved recipe      cluster.yaml  resolved cluster config
        logs/rankN.log  metrics.jsonl  result.json  checkpoints/ (local copies)
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config import ClusterConfig, RecipeConfig, config_hash, to_yaml
from launcher.errors import UsageError


@dataclass(frozen=True)
class Run:
    name: str
    dir: Path

    @property
    def info_path(self) -> Path:
        return self.dir / "run.json"

    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text()) if self.info_path.exists() else {}

    def result(self) -> dict[str, Any]:
        """What the trainer wrote at the end of the last launch (empty while running or after a crash)."""
        path = self.dir / "result.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def update(self, **fields: Any) -> None:
        info = {**self.info(), **fields}
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.info_path)  # atomic: a reader never sees half a file


def default_run_name(recipe: RecipeConfig) -> str:
    """Recipe name plus a hash of the resolved config: the same command finds the same run again,
    while changed overrides start a new one."""
    return f"{recipe.name}-{config_hash(recipe)[:8]}"


def runs_root(cluster: ClusterConfig, override: Optional[str]) -> Path:
    return Path(override or cluster.runs_dir).expanduser().resolve()


def find_run(name: str, root: Path) -> Run:
    run = Run(name, root / name)
    if not run.info_path.exists():
        known = sorted(p.name for p in root.glob("*/run.json")) if root.exists() else []
        names = ", ".join(p.split("/")[0] for p in known) or "none"
        raise UsageError(f"{root / name}: no such run (runs in {root}: {names})")
    return run


def checkpoint_uri(recipe: RecipeConfig, run_name: str) -> Optional[str]:
    """The run's own folder under `checkpoint.uri`, or None: local checkpoints only."""
    uri = recipe.checkpoint.uri
    return f"{uri.rstrip('/')}/{run_name}" if uri else None


def prepare_run(recipe: RecipeConfig, cluster: ClusterConfig, name: str, root: Path, resume: str,
                run_id: Optional[str] = None) -> Run:
    """The run directory, created or updated for this launch; a new run takes `run_id` if given."""
    run = Run(name, root / name)
    previous = run.info()
    if previous and resume == "never" and any((run.dir / "checkpoints").glob("step-*")):
        raise UsageError(f"run {name!r} already has checkpoints in {run.dir / 'checkpoints'}; "
                         "pass --resume auto to continue it, or choose another --run-name")
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "result.json").unlink(missing_ok=True)  # belongs to the previous launch
    (run.dir / "config.yaml").write_text(to_yaml(recipe))
    (run.dir / "cluster.yaml").write_text(to_yaml(cluster))
    run.update(
        run_name=name,
        run_id=previous.get("run_id") or run_id or uuid.uuid4().hex[:12],  # the tracker's id: kept across launches
        recipe=recipe.name,
        cluster=cluster.name,
        backend=cluster.backend,
        resume=resume,
        checkpoint_uri=checkpoint_uri(recipe, name),
        config_hash=config_hash(recipe),
        created=previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        launches=previous.get("launches", 0) + 1,
    )
    return run
