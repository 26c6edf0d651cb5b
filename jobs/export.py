"""`launcher export RUN --to model.pt`: the newest committed checkpoint's model as a plain state dict."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from jobs.checkpoint import Checkpointer, strip_prefixes
from jobs.storage import filesystem
from launcher.config import ClusterConfig, RecipeConfig, load_resolved


def export_run(run_dir: Path, to: str) -> tuple[str, int]:
    """Returns (where the weights came from, tensors written). Falls back to the final model.pt of a
    completed run that kept no checkpoint."""
    recipe = load_resolved(run_dir / "config.yaml", RecipeConfig)
    cluster = load_resolved(run_dir / "cluster.yaml", ClusterConfig)
    info = json.loads((run_dir / "run.json").read_text())
    ckpt = Checkpointer(recipe.checkpoint, run_dir / "checkpoints", info.get("checkpoint_uri"), cluster.storage,
                        is_writer=False)
    try:
        where = ckpt.latest()
        if where is not None:
            state = strip_prefixes(ckpt.load(where, map_location="cpu")["model"])
        elif (run_dir / "model.pt").exists():
            where = str(run_dir / "model.pt")
            state = torch.load(where, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"run {run_dir.name} has no committed checkpoint and no final model.pt")
    finally:
        ckpt.close()
    buf = io.BytesIO()
    torch.save(state, buf)
    fs, path = filesystem(to, cluster.storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return where, len(state)
