"""The commit record of a checkpoint: `step-N/manifest.json` (jobs.storage.MANIFEST), written last.

A folder is a checkpoint only once its manifest exists and every file it lists has the listed size
(and, when read, SHA-256). A manifest can cover files written by several ranks (a sharded save):
each entry may name the rank that wrote it; one process gathers the entries and commits.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

FORMAT = 1


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step {step} is negative; steps count optimizer steps from 0")
    return f"step-{step:09d}"


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
