"""What every command that starts runs checks first, in one place (`launch`, `sbatch`, `sweep`; `show`
without the backend's check): the recipe with its overrides, its name, the cluster config, the two
against each other, and the backend's own check, all before a directory or a job exists; then, per
run, that it is not still running and that its remote checkpoint folder is not another run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from launcher import backends
from launcher.backends.base import Backend
from launcher.ownership import check_checkpoint_folder
from schema.run_dir import Run
from launcher.runs import prepare_run, run_at, runs_root
from schema import ClusterConfig, RecipeConfig, load_cluster, load_recipe
from schema.recipe import DEFAULT_LOSS
from schema.names import check_name


def check_imports(recipe: RecipeConfig, src: str) -> None:
    """Import the recipe's user code (model, data, loss, metrics) as the ranks will, with the launch
    directory first on the path: a typo'd import path fails here, before a directory or a job exists.
    Built-in recipes name only the project's own modules and skip it: no torch import for them."""
    from jobs.targets import check_imports as import_targets  # imports user code, which imports torch

    if any((recipe.model.target, recipe.data.target, recipe.loss.target != DEFAULT_LOSS, recipe.metrics)):
        import_targets(recipe, src, Path.cwd())


@dataclass(frozen=True)
class Target:
    """The cluster config a command was given, loaded, with the backend it names: where runs go."""

    given: str  # as given to --cluster (a name or a path): how errors name it
    cluster: ClusterConfig
    backend: Backend

    @classmethod
    def load(cls, given: str) -> Target:
        cluster = load_cluster(given)
        return cls(given, cluster, backends.get(cluster.backend))

    def recipe(self, recipe: str, overrides: Sequence[str], check_backend: bool = True) -> RecipeConfig:
        """The recipe with `overrides`, checked: its name (run and job names derive from it), against
        this cluster config (e.g. one rank per GPU), and by the backend (e.g. `sbatch` on PATH)."""
        loaded = load_recipe(recipe, list(overrides))
        check_name("recipe name (default run names begin with it)", loaded.name)
        check_imports(loaded, f"recipe {recipe}")
        self.cluster.check_recipe(loaded, f"cluster config {self.given}")
        if check_backend:
            self.backend.check(loaded, self.cluster)
        return loaded

    def runs_root(self, override: Optional[str]) -> Path:
        """--runs-dir, or the cluster config's runs_dir."""
        return runs_root(self.cluster, override)

    def prepare(self, recipe: RecipeConfig, root: Path, name: str, resume: str, run_id: Optional[str] = None) -> Run:
        """The run directory for this launch of `name`: refused while the run still runs or is queued
        (its job would read the rewritten config), or if its remote checkpoint folder is another run's."""
        backends.refuse_if_running(run_at(root, name))  # before its directory is touched
        check_checkpoint_folder(recipe, self.cluster, run_at(root, name), run_id)  # before anything is written
        return prepare_run(recipe, self.cluster, name, root, resume, run_id=run_id)
