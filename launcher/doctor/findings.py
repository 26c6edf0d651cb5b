"""What `launcher doctor` reports: findings (with a run) and checks (without one: `launcher.checks.Check`, shared
with the backends), and how they print."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from launcher.checks import Check
from jobs.schema.errors import one_line

EVIDENCE_CHARS = 240  # a log line quoted as evidence: enough to recognise it, never a screenful


@dataclass(frozen=True)
class Line:
    """One line of a file in the run directory, as evidence: `path` relative to the run directory."""

    path: str
    number: int  # 1-based, as editors and `sed -n` count
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"

    def __str__(self) -> str:
        return f"{self.where}: {one_line(self.text.strip(), EVIDENCE_CHARS)}"


@dataclass(frozen=True)
class Finding:
    """What happened (one line), the lines that show it, and what to do."""

    what: str
    fix: str
    evidence: tuple[Line, ...] = ()
    failure: bool = True  # False: worth knowing, nothing to repair (a preemption the run recovered from)


def render_findings(run_name: str, findings: Sequence[Finding]) -> str:
    if not findings:
        return f"run {run_name}: nothing wrong found in its logs and records\n"
    out = []
    for finding in findings:
        out.append(f"{'FAILURE' if finding.failure else 'NOTE'}: {finding.what}")
        out += [f"  {line}" for line in finding.evidence]
        out.append(f"  FIX: {finding.fix}")
    return "\n".join(out) + "\n"


def render_checks(checks: Sequence[Check]) -> str:
    out = []
    for check in checks:
        mark = {True: "ok  ", False: "FAIL", None: "info"}[check.ok]
        out.append(f"{mark} {check.name}: {check.detail}")
        if check.fix:
            out.append(f"     FIX: {check.fix}")
    return "\n".join(out) + "\n"


def exit_code(found: Sequence[Finding | Check]) -> int:
    """1 when something failed, else 0."""
    return int(any(f.failure if isinstance(f, Finding) else f.ok is False for f in found))
