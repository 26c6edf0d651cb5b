"""Reading what a VM printed back. A login banner, a `.bashrc` that echoes, a broken interpreter or nothing at all
may come instead of the answer expected: each reader here ends in one HostError that names the host and shows
what came back (shortened), never in an IndexError or a JSONDecodeError."""
from __future__ import annotations

import json
from typing import Any, Optional

from launcher.vms.ssh import HostError
from jobs.schema.errors import one_line

LOG_MARK = "LAUNCHER-LOG-MTIME "  # before a log's modification time, so that a banner before it is skipped
_SHOWN = 120  # characters of a bad answer shown


def shown(text: str) -> str:
    """What came back, on one line: 'nothing' or its first characters, quoted."""
    return "nothing" if not text.strip() else repr(one_line(text.strip(), _SHOWN))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: 100k nested "[" from a broken or hostile host
        return None


def json_object(host: str, what: str, text: str) -> dict[str, Any]:
    """`text` as a JSON object."""
    value = _loads(text)
    if not isinstance(value, dict):
        raise HostError(f"{host}: {what} is not the JSON object expected: {shown(text)}",
                        hint="run the same launcher version on the VMs (vms.code: sync copies it)")
    return value


def last_json_object(host: str, what: str, stdout: str) -> dict[str, Any]:
    """The last line of `stdout` that is a JSON object: lines a login banner printed before it are skipped."""
    for line in reversed(stdout.splitlines()):
        value = _loads(line) if line.lstrip().startswith("{") else None
        if isinstance(value, dict):
            return value
    raise HostError(f"{host}: {what} answered {shown(stdout)} instead of a line of JSON",
                    hint="run it on the VM to see why (vms.python, vms.setup; a login script that fails?)")


def marked_log(host: str, stdout: str) -> Optional[tuple[int, str]]:
    """(modification time, text) from `echo LOG_MARK $(stat ...)` then the log, anything before the mark
    skipped; None if stdout has no mark (no such log there)."""
    head, found, rest = stdout.partition(LOG_MARK)
    if not found or (head and not head.endswith("\n")):
        return None
    stamp, newline, text = rest.partition("\n")
    if not stamp.strip().isdigit() or not newline:
        raise HostError(f"{host}: the log's modification time came back as {shown(stamp)}",
                        hint="check that GNU stat is installed on the VM")
    return int(stamp), text
