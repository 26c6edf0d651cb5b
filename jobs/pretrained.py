"""Pretrained weights for transfer learning: a torchvision-format state dict, a plain state dict
exported by `launcher export`, or one of this project's checkpoint directories, from any path or
fsspec URI."""
from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from jobs.models import head_prefix
from jobs.storage import filesystem
from jobs.weights import strip_prefixes
from jobs.schema import StorageConfig


def read_state_dict(uri: str, storage: StorageConfig) -> dict[str, torch.Tensor]:
    fs, path = filesystem(uri, storage)
    if fs.isdir(path):  # a checkpoint directory of ours: its model file
        path = path.rstrip("/") + "/model.pt"
        if not fs.exists(path):
            raise FileNotFoundError(f"{uri} is a directory without model.pt: point model.pretrained at a "
                                    "state-dict file or a checkpoint directory (step-N/)")
    with fs.open(path, "rb") as f:
        obj: Any = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a whole training state saved as one dict
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri} does not hold a state dict of tensors")
    return strip_prefixes(obj)


def load_pretrained(model: nn.Module, uri: str, replace_head: bool, storage: StorageConfig) -> str:
    """Load weights into `model`; with `replace_head` the final classifier layer keeps its fresh
    initialisation (the target task has other classes). Returns a line saying what was loaded."""
    state = read_state_dict(uri, storage)
    head = head_prefix(model)
    if replace_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"pretrained weights {uri} do not fit the model ({'; '.join(wrong[:3])}): "
                         "check model.variant/width/hidden/pool_size/in_channels against the weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (replace_head and k.startswith(head))]
    if missing or unexpected:
        raise ValueError(f"pretrained weights {uri}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    kept = f", head {head[:-1]} re-initialised" if replace_head else ""
    return f"{uri} ({len(state)} tensors loaded{kept})"
