"""What the launcher decided about this run, as the rank needs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jobs.schema.run_dir import Run, RunInfo, checkpoint_uri


@dataclass(frozen=True)
class RunContext:
    """Where the run lives, its names and the resume policy (read from run.json by `RunContext.of`)."""

    run_dir: Path
    run_name: str
    run_id: str
    resume: bool  # load the newest committed checkpoint before training
    checkpoint_uri: Optional[str]  # remote checkpoint folder of this run, or None for local only
    # every node sees rank 0's run directory (one machine, or a shared file system); False on VMs, where a
    # multi-node run resumes from the remote copies only
    shared_run_dir: bool = True

    @classmethod
    def of(cls, run: Run, info: Optional[RunInfo] = None, force_resume: bool = False) -> "RunContext":
        """The context of an opened run: run.json's names and resume policy (`info`, if the caller has
        read it already), the configs `run` has parsed."""
        info = info if info is not None else run.readable_info()
        return cls(run_dir=run.dir, run_name=info.run_name, run_id=info.run_id,
                   resume=force_resume or info.resume == "auto",
                   checkpoint_uri=checkpoint_uri(run.recipe(), info.run_name),  # run.json shows it redacted
                   shared_run_dir=run.cluster().nodes_share_run_dir)
