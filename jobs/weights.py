"""Plain weight files: a model state dict without wrapper prefixes, written to a path or URI, as
pretrained loading reads them and `launcher export` writes them. Apart from the checkpoint
machinery, which it only reads through."""
from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jobs.checkpoint import load_checkpoint
from jobs.storage import filesystem, is_local
from jobs.schema import StorageConfig

log = logging.getLogger("jobs.weights")
WRAPPER_NAMES = ("module", "_orig_mod")  # added by DistributedDataParallel and torch.compile


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model state dict without the wrapper prefixes DDP (`module.`) and torch.compile
    (`_orig_mod.`) add, so it loads into the bare model. The one place this is done.

    Leading wrapper names are stripped in any nesting (`_orig_mod.module.x` -> `x`); `_orig_mod`
    is also removed inside keys (a compiled submodule). An inner `module` is kept: it can be a
    real submodule's name.
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = bare_name(key)
        if new in out:
            raise ValueError(f"strip_prefixes: keys {origin[new]!r} and {key!r} both become {new!r}; "
                             f"the state dict mixes wrapped and unwrapped copies of the model")
        out[new], origin[new] = value, key
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions keyed by module path, e.g. "module.features.0"
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            sorted(((bare_name(k), v) for k, v in metadata.items()), key=lambda kv: kv[0].count(".")))
    return out


def bare_name(name: str) -> str:
    """A parameter or module name as the unwrapped model spells it (see strip_prefixes)."""
    parts = name.split(".")
    while parts and parts[0] in WRAPPER_NAMES:
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def write_weights(obj: Any, uri: str, storage: StorageConfig) -> None:
    """torch.save `obj` to a path or URI (the cluster's storage options apply), so that a reader
    never sees half a file: a local file is renamed into place, an object store gets one PUT."""
    fs, path = filesystem(uri, storage)
    if is_local(fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fs.pipe_file(path, buffer.getvalue())


def export_model(location: str, out_path: str, storage: StorageConfig, key: str = "model") -> str:
    """Write `state[key]` of a checkpoint as a plain model state dict (prefixes stripped) for
    inference: `model.load_state_dict(torch.load(out_path, weights_only=True))`. Returns out_path."""
    write_weights(strip_prefixes(load_checkpoint(location, storage, keys=[key])[key]), out_path, storage)
    log.info("exported %s of %s to %s", key, location, out_path)
    return out_path
