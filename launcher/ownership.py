"""Before a launch: the run's remote checkpoint folder must be unclaimed or already this run's.

Two runs with one name under different runs directories would share `<checkpoint.uri>/<run name>/`,
and each one's retention would delete the other's checkpoints. The rank's Checkpointer refuses such
a folder too (the store may be unreachable from here); checking here refuses the launch before
anything is written or started.
"""
from __future__ import annotations

import re
import sys
from typing import Optional

from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.run_dir import Run, checkpoint_uri
from jobs.schema.errors import UsageError
from jobs.schema.secrets import redact_text

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # what `--run-id` may be: a tracker id and a file field


def check_checkpoint_folder(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, run_id: Optional[str]) -> None:
    """Raise UsageError if the run's remote checkpoint folder belongs to another run. `run` is the
    run directory about to be prepared (it may not exist yet); `run_id` is `--run-id`, if given."""
    existing = run.info().run_id
    if run_id is not None:
        _check_given_id(run, run_id, existing)
    uri = checkpoint_uri(recipe, run.name)
    if uri is None:
        return
    from jobs.storage import filesystem, folder_owner, foreign_folder_message  # fsspec: only when needed

    try:
        fs, root = filesystem(uri, cluster.storage)
        owner = folder_owner(fs, root)
    except ValueError as err:
        raise UsageError(f"cannot tell which run owns {redact_text(uri)}: {err}", hint="if the folder belongs "
                         "to this run, delete its run-owner.json") from None
    except Exception as err:  # the store is down or needs credentials only the ranks have: they check again
        print(f"warning: cannot check which run owns {redact_text(uri)} "
              f"({redact_text(f'{type(err).__name__}: {err}')[:300]}); the run checks before its first upload",
              file=sys.stderr)
        return
    this = run_id or existing
    if owner is not None and owner != this:
        who = f"run id {this} of {run.dir}" if this else f"a new run ({run.dir} has no run.json)"
        raise UsageError(*foreign_folder_message(uri, owner, who))


def _check_given_id(run: Run, run_id: str, existing: Optional[str]) -> None:
    if not RUN_ID.match(run_id):
        raise UsageError(f"--run-id {run_id[:80]!r}: use 1 to 64 letters, digits, _ or -, starting with a letter "
                         f"or digit (the id a run was given is in its run.json and checkpoint manifests)")
    if existing and existing != run_id:
        raise UsageError(f"--run-id {run_id}: run {run.name} in {run.dir} already has run id {existing}",
                         hint="drop --run-id to continue it, or choose another --run-name or --runs-dir")
