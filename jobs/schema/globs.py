"""Gitignore-style patterns (`.launcherignore`, `vms.sync_exclude`) as regular expressions over paths relative to a
folder ("a/b/c.py"), torch-free: the schema checks them at load, the VM backend selects the files to copy with them.

Supported as git does: `#` comments and blank lines (in files), `!` to re-include, a trailing `/` for folders
only, a `/` at the start or in the middle to anchor at the folder's top, `*`, `?`, `[...]` and `**`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    text: str  # as written
    regex: re.Pattern
    negated: bool  # "!": files it matches are copied after all
    folders_only: bool  # trailing "/"

    def matches(self, relative: str, is_folder: bool) -> bool:
        return (is_folder or not self.folders_only) and self.regex.fullmatch(relative) is not None


def compile_pattern(text: str) -> Pattern:
    """One pattern; ValueError (saying why) for one that matches nothing sensible."""
    body = text.strip()
    negated = body.startswith("!")
    body = body[1:] if negated else body
    folders_only = body.endswith("/")
    body = body.rstrip("/")
    if not body or "\n" in body or "\0" in body:
        raise ValueError("is an empty pattern")
    anchored = "/" in body  # git: a slash at the start or in the middle ties the pattern to the top folder
    regex = _translate(body.lstrip("/"))
    try:
        return Pattern(text, re.compile(regex if anchored else f"(?:.*/)?{regex}", re.DOTALL), negated, folders_only)
    except re.error as err:
        raise ValueError(f"is not a valid pattern ({err.msg})") from None


def _translate(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        elif body[i] == "[" and "]" in body[i + 2:]:
            end = body.index("]", i + 2)
            inner = body[i + 1:end]
            out.append("[" + ("^" + inner[1:] if inner.startswith("!") else inner).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    return "".join(out)


def excluded(patterns: list[Pattern], relative: str, is_folder: bool) -> bool:
    """Whether `relative` is left out: the last pattern that matches it decides, as in git."""
    verdict = False
    for pattern in patterns:
        if pattern.matches(relative, is_folder):
            verdict = not pattern.negated
    return verdict


def read_patterns(text: str) -> list[str]:
    """The patterns of an ignore file's text: comments and blank lines dropped."""
    return [line for line in (raw.rstrip() for raw in text.splitlines()) if line.strip() and not line.startswith("#")]
