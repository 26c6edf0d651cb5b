"""What every command that starts runs checks first, in one place (`launch`, `sbatch`, `sweep`; `show`
without the backend's check): the recipe with its overrides, its name, the cluster config, the two
against each other, and the backend's own check, all before a directory or a job exists; then, per
run, that it is not still running and that its remote checkpoint folder is not another run's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from launcher import backends
from launcher.backends.base import Backend
from launcher.ownership import check_checkpoint_folder
from jobs.schema.run_dir import Run
from launcher.runs import code_dir_of, prepare_run, run_at, runs_root
from jobs.schema import ClusterConfig, ConfigError, RecipeConfig, load_cluster, load_recipe
from jobs.schema.errors import short, short_path
from jobs.schema.recipe import DEFAULT_LOSS
from jobs.schema.names import check_name


def resolve_code(recipe: RecipeConfig, src: str) -> RecipeConfig:
    """The recipe with `script.path` made absolute (the ranks may start elsewhere), checked with its
    code_dir: the directory exists, the script is a file, a script module can be found. code_dir
    itself stays as written (run.json holds it resolved), so the default run names of trainer recipes
    do not depend on the directory they are launched from; a script recipe's does, through its
    absolute path (another checkout's script is another run)."""
    code_dir = code_dir_of(recipe)
    _refuse_unusable_path(code_dir, src, "code_dir")
    if not code_dir.is_dir():
        raise ConfigError(src, "code_dir", f"{short_path(code_dir)} is not a directory",
                          "point code_dir at the folder that holds your code (default: the launch directory)")
    _check_no_shadowing(code_dir, src)
    script = recipe.script
    if script is None:
        return recipe
    if script.path is not None:
        path = (code_dir / script.path).resolve()
        _refuse_unusable_path(path, src, "script.path")
        if not path.is_file():
            what = "is a directory, not a script" if path.is_dir() else "no such file"
            raise ConfigError(src, "script.path", f"{what}: {short_path(path)}",
                              "give the script's path (relative paths start at code_dir)")
        return dataclasses.replace(recipe, script=dataclasses.replace(script, path=str(path)))
    _check_module(script.module or "", code_dir, src)
    return recipe


def _refuse_unusable_path(path: Path, src: str, key: str) -> None:
    """A path the system itself refuses (a name too long, a denied folder on the way) is a ConfigError:
    pathlib's is_dir/is_file say False only for a missing file and raise for these."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # said by the caller, with what the path should be
    except OSError as err:
        raise ConfigError(src, key, f"{short_path(path)}: {err.strerror or err}",
                          "give a path this machine can open") from None


# The launcher's own packages: code_dir goes first on every rank's import path, so a user folder with one of
# these names would replace ours there (the ranks would import the user's `jobs`, not the trainer).
OWN_PACKAGES = {"launcher": Path(__file__).resolve().parent, "jobs": Path(__file__).resolve().parents[1] / "jobs"}


def _check_no_shadowing(code_dir: Path, src: str) -> None:
    """Refuse a code_dir holding a package or module named like one of ours (unless it is ours: a checkout)."""
    for name, ours in OWN_PACKAGES.items():
        for found in (code_dir / name / "__init__.py", code_dir / f"{name}.py"):
            if found.is_file() and found.resolve().parent != ours:
                shown = short_path(found.parent if found.name == "__init__.py" else found)
                raise ConfigError(src, "code_dir", f"{shown} would replace the launcher's own '{name}' package "
                                  "on every rank", f"rename your {name!r} (e.g. my_{name}) or set code_dir to a "
                                  "folder without it")


def _check_module(module: str, code_dir: Path, src: str) -> None:
    """`python -m module` will find it on the ranks: find it here, with code_dir first on the path."""
    from jobs.targets import on_import_path

    with on_import_path(code_dir):
        try:
            spec = importlib.util.find_spec(module)
            # `python -m pkg` runs pkg.__main__: a package without one would fail on every rank
            runs = spec is not None and (spec.submodule_search_locations is None
                                         or importlib.util.find_spec(f"{module}.__main__") is not None)
        except (Exception, SystemExit) as err:  # finding pkg.mod imports pkg: user code, which may raise anything
            raise ConfigError(src, "script.module", f"{module}: {type(err).__name__}: {short(str(err))}",
                              f"make it importable from {code_dir}") from None
    if spec is None:
        raise ConfigError(src, "script.module", f"no module named {module!r} in {code_dir} or the environment",
                          "check the name, or set code_dir to the folder that holds the package")
    if not runs:
        raise ConfigError(src, "script.module", f"{module!r} is a package without a __main__ module",
                          f"name the module to run (e.g. {module}.train), or add {module}/__main__.py")


def check_imports(recipe: RecipeConfig, src: str) -> None:
    """Import the recipe's user code (model, data, loss, metrics) as the ranks will, with the launch
    directory first on the path: a typo'd import path fails here, before a directory or a job exists.
    Built-in recipes name only the project's own modules and skip it: no torch import for them."""
    from jobs.targets import check_imports as import_targets  # imports user code, which imports torch

    if any((recipe.model.target, recipe.data.target, recipe.loss.target != DEFAULT_LOSS, recipe.metrics,
            recipe.parallel.tp_plan)):
        import_targets(recipe, src, code_dir_of(recipe))


def check_layout(recipe: RecipeConfig, src: str) -> None:
    """Split points, FSDP and compile's block names, blocks to checkpoint and the tensor-parallel plan checked
    against the model (built on the meta device) before anything is written or queued. Only recipes that
    name modules, need blocks or split them pay for the torch import."""
    p = recipe.parallel
    if p.strategy == "pipeline" or p.fsdp_blocks or p.tensor_parallel > 1 or p.activation_checkpointing != "none" \
            or recipe.trainer.compile_exclude:
        from jobs.parallel.preflight import check_layout as check_model_layout

        check_model_layout(recipe, src)


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

    def recipe(self, recipe: str, overrides: Sequence[str], check_backend: bool = True,
               launching: bool = True) -> RecipeConfig:
        """The recipe with `overrides`, checked: its name (run and job names derive from it), against
        this cluster config (e.g. one rank per GPU), and by the backend (e.g. `sbatch` on PATH)."""
        return self.checked(load_recipe(recipe, list(overrides)), f"recipe {recipe}", check_backend, launching)

    def checked(self, loaded: RecipeConfig, src: str, check_backend: bool = True,
                launching: bool = True) -> RecipeConfig:
        """A loaded recipe (from a file or made by `launcher run`) resolved and checked as `recipe()`
        says; `launching=False` (`show`) skips where the code lives (shared_paths): nothing runs."""
        check_name("recipe name (default run names begin with it)", loaded.name)
        loaded = resolve_code(loaded, src)
        check_imports(loaded, src)
        check_layout(loaded, src)
        self.cluster.check_recipe(loaded, f"cluster config {self.given}")
        if launching:
            self.cluster.check_shared("code_dir", str(code_dir_of(loaded)), f"cluster config {self.given}")
        if check_backend:
            self.backend.check(loaded, self.cluster)
        return loaded

    def runs_root(self, override: Optional[str]) -> Path:
        """--runs-dir, or the cluster config's runs_dir (on the shared file system, if the config names it)."""
        root = runs_root(self.cluster, override)
        self.cluster.check_shared("runs directory", str(root), f"cluster config {self.given}")
        return root

    def prepare(self, recipe: RecipeConfig, root: Path, name: str, resume: str, run_id: Optional[str] = None) -> Run:
        """The run directory for this launch of `name`: refused while the run still runs or is queued
        (its job would read the rewritten config), or if its remote checkpoint folder is another run's."""
        backends.refuse_if_running(run_at(root, name))  # before its directory is touched
        check_checkpoint_folder(recipe, self.cluster, run_at(root, name), run_id)  # before anything is written
        return prepare_run(recipe, self.cluster, name, root, resume, run_id=run_id)
