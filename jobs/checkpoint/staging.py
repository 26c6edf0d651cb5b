"""Host staging: what a state may hold, and the copy of it into host memory that lets training go on
while the copy is written (the only part of an async save training waits for)."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor

STATE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Leaves torch.load(weights_only=True) accepts; anything else is refused at save() time, when the
# user can still fix it, rather than at resume time.
PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def check_state(state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
    """Refuse state keys that cannot be file names; the metrics as floats."""
    if not isinstance(state, dict) or not state:
        raise TypeError(f"checkpoint state must be a non-empty dict of name -> object, got {state!r:.80}")
    for key in state:
        if not isinstance(key, str) or not STATE_KEY.match(key) or key == "manifest":
            raise ValueError(f"checkpoint state key {key!r} cannot be a file name: use letters, digits, _ . - "
                             f"(and not 'manifest')")
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metrics must be numbers, got {metrics!r:.200}: {err}") from None


def check_leaves(state: dict[str, Any]) -> None:
    """The refusals of a snapshot, without copying (a synchronous save writes the state as it is)."""
    for key, value in state.items():
        copy_tree(value, key, lambda t, where: t)


def copy_tree(obj: Any, where: str, copy_tensor: Callable[[Tensor, str], Tensor]) -> Any:
    """Rebuild the containers of `obj` (training keeps mutating the originals) with `copy_tensor`
    applied to every tensor; refuse anything torch.load(weights_only=True) would refuse."""
    if isinstance(obj, Tensor):
        return copy_tensor(obj, where)
    if isinstance(obj, PLAIN_LEAVES) or isinstance(obj, torch.Size):
        return obj  # immutable
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((k, copy_tree(v, f"{where}.{k}", copy_tensor)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() versions, read by load_state_dict
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple, set):
        return type(obj)(copy_tree(v, f"{where}[{i}]", copy_tensor) for i, v in enumerate(obj))
    raise TypeError(f"checkpoint state {where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    f"saved; only tensors, numbers, strings, None and dict/list/tuple/set of them load with "
                    f"weights_only=True. Convert it (e.g. .item(), torch.from_numpy(), a state_dict() of "
                    f"plain values)")


class HostBuffers:
    """Host tensors a snapshot is copied into, kept across saves: allocating 400 MB afresh costs
    page faults that take ~25x longer than the copy itself."""

    def __init__(self) -> None:
        self.by_path: dict[str, Tensor] = {}

    def snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        seen: dict[tuple, Tensor] = {}  # tensors sharing memory (tied weights) stay shared
        devices: set[torch.device] = set()

        def copy(t: Tensor, where: str) -> Tensor:
            if t.layout != torch.strided:
                return t.detach().to("cpu", copy=True)
            identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                        t.dtype)
            if identity in seen:
                return seen[identity]
            buf = self.by_path.get(where)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != t.is_cuda:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self.by_path[where] = buf
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            seen[identity] = buf
            return buf

        with torch.no_grad():
            snap = {key: copy_tree(value, key, copy) for key, value in state.items()}
        used = {id(t) for t in seen.values()}
        self.by_path = {p: b for p, b in self.by_path.items() if id(b) in used}  # state that went away
        for device in devices:  # the non_blocking copies must land before save() returns
            torch.cuda.synchronize(device)
        return snap
