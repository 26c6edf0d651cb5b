"""What the launcher decided about this run, as the rank needs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class RunContext:
    """Where the run lives, its names and the resume policy (read from run.json by jobs.train)."""

    run_dir: Path
    run_name: str
    run_id: str
    resume: bool  # load the newest committed checkpoint before training
    checkpoint_uri: Optional[str]  # remote checkpoint folder of this run, or None for local only
