"""The doctor's storage rules: a full disk, a checkpoint store that could not be reached."""
from __future__ import annotations

import re

from launcher.doctor.findings import Finding
from launcher.doctor.ranks import lines_matching, on_rank
from launcher.doctor.records import RunRecords

DISK_FULL = re.compile(r"No space left on device|Errno 28\b|Disk quota exceeded|Errno 122\b")
FREE_SPACE = re.compile(r"Free space in (\S+)")  # jobs.checkpoint names the folder to clean up
WRITING = re.compile(r"writing (\S+) failed|'(/[^']+)'")


def disk_full(records: RunRecords) -> list[Finding]:
    hits = lines_matching(records, DISK_FULL)
    if not hits:
        return []
    m = FREE_SPACE.search(hits[0].text) or WRITING.search(hits[0].text)
    where = next((g.rstrip(".") for g in m.groups() if g), None) if m else None
    keep = records.setting("checkpoint", "keep_last")
    what = f"the disk was full{on_rank(hits[0])}" + (f" in {where}" if where else "") + \
        (f" ({len(hits)} times)" if len(hits) > 1 else "")
    fix = (f"free space on that file system (df -h {where or '<path>'}); keep fewer checkpoints (checkpoint.keep_last"
           f"{f'={keep} now' if keep is not None else ''}); or move runs_dir or checkpoint.uri to a larger disk or "
           "an object store")
    return [Finding(what, fix, (hits[0], *hits[1:][-1:]))]


STORE_DOWN = re.compile(r"EndpointConnectionError|Could not connect to the endpoint URL|"
                        r"checkpoints? .* (?:were|was) not uploaded to")
ENDPOINT = re.compile(r"endpoint URL: \"?(https?://[^/\"\s]+)")


def store_down(records: RunRecords) -> list[Finding]:
    hits = lines_matching(records, STORE_DOWN)
    if not hits:
        return []
    endpoint = next((m.group(1) for line in hits if (m := ENDPOINT.search(line.text))), None)
    uri = records.setting("checkpoint", "uri")
    pending = [line for line in hits if "not uploaded" in line.text]
    what = f"the checkpoint store{f' at {endpoint}' if endpoint else ''} could not be reached{on_rank(hits[0])}"
    what += f" ({len(hits) - len(pending)} failed uploads)" if len(hits) > len(pending) else ""
    if pending or records.result.checkpoints_committed is False:
        what += "; checkpoints stayed local, not uploaded to " + (str(uri) if uri else "checkpoint.uri")
    fix = ("check that the store is up and that storage.endpoint_url and the credentials are right "
           "(launcher doctor --cluster C --store URI checks both from here); the run keeps its checkpoints in its "
           "run directory, and its next launch uploads them")
    return [Finding(what, fix, (hits[0], *pending[-1:]))]
