"""The VM backend's record of a run: what it keeps in run.json besides RunInfo's own fields.

RunInfo keeps keys it does not know in `extra` and writes them back as they were, so the file is unchanged
by this type: `VmState.of(info)` reads them, typed; `VmState.entries(...)` writes them through `Run.update`.
Two copies of run.json hold parts of it:

- this machine's (written by `launch`): node 0 (`vm_head`), the run's folder there (`vm_run_dir`), the hosts
  of the launch, and the pid of the supervisor it started (`vm_supervisor`);
- node 0's (written by the supervisor, `launcher.vms.supervise`): its launches, the hosts and the placement
  of ranks in the last one, what it waits for, the last spot notice and how long the save after it took,
  and its own pid and start time (`supervisor_pid`, `supervisor_start`: never copied to other hosts).

Only the launcher reads it (the ranks on the VMs read RunInfo's fields), so it lives with the VM backend.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from jobs.schema.run_dir import RunInfo


@dataclass(frozen=True)
class VmState:
    head: Optional[str] = field(default=None, metadata={"key": "vm_head"})  # node 0's address
    run_dir: Optional[str] = field(default=None, metadata={"key": "vm_run_dir"})  # the run's folder on node 0
    hosts: tuple[str, ...] = ()  # the (last) launch's hosts, node 0 first
    started_pid: Optional[int] = field(default=None, metadata={"key": "vm_supervisor"})  # as `launch` started it
    launches: int = field(default=0, metadata={"key": "vm_launches"})  # node 0: launches the supervisor made
    supervisor_pid: Optional[int] = None  # node 0: the supervisor's own record, with its start time, so
    supervisor_start: Optional[int] = None  # that a reused pid is not taken for it
    placement: dict = field(default_factory=dict)  # node 0: host -> its ranks in the last launch
    waiting_for: Optional[str] = None  # node 0: why the supervisor waits for hosts
    last_notice: Optional[dict] = None  # node 0: the last spot notice, as the node agent reported it, and when
    notice_to_saved_s: Optional[float] = None  # node 0: from a preemption notice to every node having saved
    nodes: Optional[int] = field(default=None, metadata={"key": "vm_nodes"})  # node 0: VMs of the last launch
    resizes: int = field(default=0, metadata={"key": "vm_resizes"})  # node 0: launches on another number of VMs

    @classmethod
    def of(cls, info: RunInfo) -> "VmState":
        return cls.from_dict(info.extra)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VmState":
        """From run.json's keys (any others are ignored). A value of the wrong type (a hand-edited file) reads as
        unset, as RunInfo's own fields do, rather than failing `status` with a traceback."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = data.get(_key(f))
            if f.name == "hosts":
                value = tuple(value) if isinstance(value, list) and all(isinstance(h, str) for h in value) else None
            elif value is not None and (isinstance(value, bool) or not isinstance(value, _TYPES[f.name])):
                value = None
            if value is not None:
                values[f.name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, under their run.json keys (JSON types: the hosts as a list)."""
        return {_key(f): _json(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default and getattr(self, f.name) not in (None, (), {})}

    @classmethod
    def keys(cls, *names: str) -> tuple[str, ...]:
        """run.json's keys of the fields `names`, e.g. for `Run.update(remove=...)`."""
        return tuple(_keys_by_name(names).values())

    @classmethod
    def entries(cls, **values: Any) -> dict[str, Any]:
        """Fields as run.json's entries, for `Run.update(**...)`: `entries(hosts=[...], launches=2)`."""
        keys = _keys_by_name(values)
        return {keys[name]: _json(value) for name, value in values.items()}


def _keys_by_name(names: Any) -> dict[str, str]:
    by_name = {f.name: _key(f) for f in dataclasses.fields(VmState)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TypeError(f"VmState has no field {unknown[0]!r}")
    return {n: by_name[n] for n in names}


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_TYPES: dict[str, Any] = {"head": str, "run_dir": str, "started_pid": int, "launches": int, "supervisor_pid": int,
                          "supervisor_start": int, "placement": dict, "waiting_for": str, "last_notice": dict,
                          "notice_to_saved_s": (int, float), "nodes": int, "resizes": int}
