"""The one rule for names that become file names: run, recipe and sweep names, and run arguments.

A name is a single path component in the runs directory (`<runs_dir>/<run name>/`, `sweeps/<sweep>.json`),
a Slurm job name and a tracker run name, so it must not be able to leave that directory (`..`, `/`),
hide in a listing (a leading `.` or `-`), end a line in a script or log (control characters) or exceed
what file systems and schedulers accept. Anything else is refused before a file or a job exists.
"""
from __future__ import annotations

import re

from jobs.schema.errors import UsageError, short

MAX_LENGTH = 128
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")
RULE = (f"1 to {MAX_LENGTH} characters from A-Z a-z 0-9 . _ -, starting with a letter or a digit "
        "(a name is one folder in the runs directory, never a path)")


def check_name(kind: str, value: str) -> str:
    """`value` if it is a valid name; otherwise a UsageError naming `kind` (e.g. "run name") and the rule."""
    # fullmatch, not match with `$`: `$` would also accept a trailing newline
    if _NAME.fullmatch(value) is None:
        raise UsageError(f"{kind} {short(value)} is not a valid name", hint=f"use {RULE}")
    return value
