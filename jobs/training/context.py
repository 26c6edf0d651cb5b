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
    # every node sees rank 0's run directory (one machine, or a shared file system); False on VMs, where a
    # multi-node run resumes from the remote copies only
    shared_run_dir: bool = True
