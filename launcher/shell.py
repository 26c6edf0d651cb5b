"""Quoting for shell lines that run on another machine (a VM over SSH, a SkyPilot node)."""
from __future__ import annotations

import shlex


def shell_path(path: str) -> str:
    """`path` quoted for a remote shell, a leading "~/" kept meaning that machine's home (quoted, it would not)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
