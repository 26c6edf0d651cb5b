"""`launcher export RUN --to model.pt`: the newest committed checkpoint's model as a plain state dict."""
from __future__ import annotations

from pathlib import Path

import torch

from jobs.checkpoint import Checkpointer, export_model
from schema import ClusterConfig, RecipeConfig, load_resolved
from schema.run_dir import Run, checkpoint_uri


def export_run(run_dir: Path, to: str) -> str:
    """Write the weights to `to` (path or URI); returns where they came from. A completed run that
    kept no checkpoint falls back to its final model.pt."""
    recipe = load_resolved(run_dir / "config.yaml", RecipeConfig)
    cluster = load_resolved(run_dir / "cluster.yaml", ClusterConfig)
    info = Run(run_dir.name, run_dir).readable_info()
    # the URI from the recipe: run.json shows it with credentials masked; the run id guards the folder's owner
    ckpt = Checkpointer(recipe.checkpoint, run_dir / "checkpoints", checkpoint_uri(recipe, info.run_name),
                        cluster.storage, is_writer=False, run_id=info.run_id or None)
    try:
        where = ckpt.latest()
    finally:
        ckpt.close()
    if where is None:
        final = run_dir / "model.pt"
        if not final.exists():
            raise FileNotFoundError(f"run {run_dir.name} has no committed checkpoint and no final model.pt")
        Path(to).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.load(final, map_location="cpu", weights_only=True), Path(to))
        return str(final)
    export_model(where, to, cluster.storage)
    return where
