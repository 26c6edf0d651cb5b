"""The one place a run's Checkpointer is built (training, `launcher export`, a script's `runtime.checkpointer()`)."""
from __future__ import annotations

from jobs.checkpoint import Checkpointer
from jobs.schema import RecipeConfig, StorageConfig
from jobs.schema.run_dir import CHECKPOINTS
from jobs.training.context import RunContext


def checkpointer_for(run: RunContext, recipe: RecipeConfig, storage: StorageConfig, *, is_writer: bool,
                     sharded: bool = False, spread: bool = False) -> Checkpointer:
    """The checkpointer of `run`: checkpoint.* of its recipe, local copies in <run>/checkpoints, its remote
    folder (with the storage credentials of its cluster), its run id as the owner of that folder."""
    return Checkpointer(recipe.checkpoint, run.run_dir / CHECKPOINTS, run.checkpoint_uri, storage,
                        is_writer=is_writer, run_id=run.run_id, sharded=sharded, spread=spread)
