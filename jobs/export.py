"""`launcher export RUN --to model.pt`: the newest committed checkpoint's model as a plain state dict."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from jobs.run_checkpointer import checkpointer_for
from jobs.training.context import RunContext
from jobs.weights import strip_prefixes, write_weights
from jobs.schema.run_dir import FINAL_MODEL, Run


def export_run(run_dir: Path, to: str) -> str:
    """Write the weights to `to` (path or URI, with the cluster's storage options); returns where
    they came from. A completed run that kept no checkpoint falls back to its final model.pt."""
    run = Run.at(run_dir)
    recipe, cluster = run.recipe(), run.cluster()
    context = RunContext.of(run)
    # the run id guards the folder's owner; a run.json without one reads the folder whoever owns it
    context = dataclasses.replace(context, run_id=context.run_id or None)
    ckpt = checkpointer_for(context, recipe, cluster.storage, is_writer=False)
    try:
        found = ckpt.load_latest(map_location="cpu", keys=["model"])  # each file read once, hashes checked
    finally:
        ckpt.close()
    if found is not None:
        where, state = found
        write_weights(strip_prefixes(state["model"]), to, cluster.storage)
        return where
    final = run_dir / FINAL_MODEL
    if not final.exists():
        raise FileNotFoundError(f"run {run.name} has no committed checkpoint and no final model.pt")
    write_weights(torch.load(final, map_location="cpu", weights_only=True), to, cluster.storage)
    return str(final)
