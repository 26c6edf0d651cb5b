"""`launcher export RUN --to model.pt`: the newest committed checkpoint's model as a plain state dict."""
from __future__ import annotations

from pathlib import Path

import torch

from jobs.checkpoint import Checkpointer
from jobs.weights import strip_prefixes, write_weights
from jobs.schema import ClusterConfig, RecipeConfig, load_resolved
from jobs.schema.run_dir import Run, checkpoint_uri


def export_run(run_dir: Path, to: str) -> str:
    """Write the weights to `to` (path or URI, with the cluster's storage options); returns where
    they came from. A completed run that kept no checkpoint falls back to its final model.pt."""
    recipe = load_resolved(run_dir / "config.yaml", RecipeConfig)
    cluster = load_resolved(run_dir / "cluster.yaml", ClusterConfig)
    info = Run(run_dir.name, run_dir).readable_info()
    # the URI from the recipe: run.json shows it with credentials masked; the run id guards the folder's owner
    ckpt = Checkpointer(recipe.checkpoint, run_dir / "checkpoints", checkpoint_uri(recipe, info.run_name),
                        cluster.storage, is_writer=False, run_id=info.run_id or None)
    try:
        found = ckpt.load_latest(map_location="cpu", keys=["model"])  # each file read once, hashes checked
    finally:
        ckpt.close()
    if found is not None:
        where, state = found
        write_weights(strip_prefixes(state["model"]), to, cluster.storage)
        return where
    final = run_dir / "model.pt"
    if not final.exists():
        raise FileNotFoundError(f"run {run_dir.name} has no committed checkpoint and no final model.pt")
    write_weights(torch.load(final, map_location="cpu", weights_only=True), to, cluster.storage)
    return str(final)
