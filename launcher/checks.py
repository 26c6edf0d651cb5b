"""What `launcher doctor` checks without a run, as types both it and the backends use: a backend names its
own checks (`Backend.environment_checks`: Slurm's commands and controller, each VM over SSH) and the doctor
adds what every backend needs (launcher.doctor.environment). Neither imports the other: both import this.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from jobs.schema.errors import one_line

CHECK_TIMEOUT_S = 8.0  # one check (a command, a store listing): a hung service must not hang the doctor
SSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """One check of the environment: `ok` None is information (e.g. no GPU on a login node), not a failure."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


def bounded(call: Callable[[], Any], seconds: float = CHECK_TIMEOUT_S) -> tuple[Any, Optional[BaseException]]:
    """call() in a daemon thread: (its value, None), (None, its exception), or (None, TimeoutError)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = call()
        except BaseException as err:  # noqa: BLE001 - reported as the check's failure
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)  # a call that never returns is left behind, not waited on
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return None, TimeoutError(f"no answer within {seconds:g} s")
    return out.get("value"), out.get("error")


def last_line(text: str) -> str:
    """The last non-blank line of a command's stderr, for a check's detail."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return one_line(lines[-1], 200) if lines else "(nothing on stderr)"
