"""The checkpoint layout: every name a checkpoint folder holds and the parsing of its records.

    <dir>/step-000000123/            one checkpoint (`step_dir_name`, `parse_step_dir`)
    <dir>/step-000000123/manifest.json  the commit record (`Manifest`), written last
    <dir>/latest                     text: the newest committed folder (`POINTER`, a hint for humans)
    <remote>/run-owner.json          the run the remote folder belongs to (`OWNER_FILE`, `owner_record`)
    <local_dir>/saves.jsonl          one JSON line per save and per upload (`SAVES_LOG`)

A folder is a checkpoint only once its manifest exists and every file it lists has the listed size
(and, when read, SHA-256). A manifest can cover files written by several ranks (a sharded save):
each entry may name the rank that wrote it; one process gathers the entries and commits.

Torch-free and free of the package's other modules, on purpose: the writers, the uploader and the
readers import the layout, never each other, and the control plane (jobs.storage, the launcher) can
read a folder's owner without importing torch. The two names the launcher shares (MANIFEST,
STEP_DIR) stay defined in the config kernel, jobs.schema.run_dir, and are re-exported here.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

from jobs.schema.run_dir import MANIFEST, STEP_DIR

FORMAT = 1
POINTER = "latest"
SAVES_LOG = "saves.jsonl"
OWNER_FILE = "run-owner.json"

__all__ = ["FORMAT", "MANIFEST", "OWNER_FILE", "POINTER", "SAVES_LOG", "STEP_DIR", "FileEntry", "Manifest",
           "manifest_run_id", "owner_record", "parse_owner_record", "parse_step_dir", "step_dir_name"]


# ---------------------------------------------------------------------- step folders
def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step {step} is negative; steps count optimizer steps from 0")
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> Optional[int]:
    """The step of a `step-N` folder name, or None for any other name."""
    match = STEP_DIR.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------- the owner record
def owner_record(run_id: str, created: float) -> str:
    """The text of `run-owner.json` claiming a folder for `run_id`."""
    return json.dumps({"run_id": run_id, "created": created}) + "\n"


def parse_owner_record(text: str | bytes, where: str) -> str:
    """The run id an owner record names; ValueError (naming `where`) for one that does not hold one."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        raise ValueError(f"{where} does not hold a run id ({str(data)[:80]!r})")
    return data["run_id"]


def manifest_run_id(text: str | bytes) -> Optional[str]:
    """The run a manifest names, read leniently (any format): a folder without an owner record
    belongs to the run its manifests name. ValueError/AttributeError for text that is not a JSON object."""
    run_id = json.loads(text).get("run_id")
    return run_id if isinstance(run_id, str) else None


# ---------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    rank: Optional[int] = None  # the rank that wrote the file, in a save several ranks write; None: the writer

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "sha256": self.sha256, **({"rank": self.rank} if self.rank is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "FileEntry":
        rank = data.get("rank")
        return cls(int(data["size"]), str(data["sha256"]), None if rank is None else int(rank))


@dataclass(frozen=True)
class Manifest:
    step: int
    metrics: dict[str, float]
    created: float  # seconds since the epoch
    files: dict[str, FileEntry]  # file name -> size and hash
    run_id: Optional[str] = None  # the run that wrote it (None: written before manifests named their run)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "step": self.step, "metrics": self.metrics, "created": self.created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "files": {name: f.to_dict() for name, f in self.files.items()},
            **({"run_id": self.run_id} if self.run_id else {}),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Raises ValueError/KeyError/TypeError on anything malformed."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        files = {str(n): FileEntry.from_dict(f) for n, f in data["files"].items()}
        metrics = {str(k): float(v) for k, v in data["metrics"].items()}
        if int(data["step"]) < 0:
            raise ValueError(f"negative step {data['step']}")
        run_id = data.get("run_id")
        return cls(int(data["step"]), metrics, float(data["created"]), files, str(run_id) if run_id else None)
