"""What `launcher status` and `launcher cancel` run on node 0 over SSH: one JSON line out, no torch.

    python -m launcher.vms.remote status --run-dir DIR     run.json, result.json, whether the supervisor lives
    python -m launcher.vms.remote cancel --run-dir DIR     SIGTERM to the supervisor (it stops every node)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from launcher.backends import process_start
from launcher.vms.layout import PID_FILE
from launcher.vms.state import VmState
from jobs.schema.run_dir import Run


def supervisor_pid(run: Run) -> Optional[int]:
    """The supervisor's pid if it still runs: the one it recorded with its start time (a reused pid is not
    it), or, while it is starting and has recorded nothing yet, the one the launch wrote (if that process
    is a supervisor)."""
    state = VmState.of(run.info())
    pid, start = state.supervisor_pid, state.supervisor_start
    if pid is not None and pid > 0:
        return pid if process_start(pid) is not None and process_start(pid) == start else None
    try:
        pid = int((run.dir / PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"launcher.vms.supervise" in command and process_start(pid) is not None else None


def status(run: Run) -> dict[str, Any]:
    return {"info": run.info().to_dict(), "result": run.result().to_dict() if run.result() else None,
            "supervisor": supervisor_pid(run)}


def cancel(run: Run) -> dict[str, Any]:
    pid = supervisor_pid(run)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    return {"signalled": pid}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["status", "cancel"])
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    folder = Path(args.run_dir).expanduser()
    run = Run.at(folder)
    if not run.info_path.exists():
        print(json.dumps({"missing": str(folder)}))
        return 0
    print(json.dumps(status(run) if args.what == "status" else cancel(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
