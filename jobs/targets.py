"""Import paths in recipes (`model.target: "mypkg.nets:build"`): import the module, look the attribute
up, check it is callable, and check what a factory returned. Each failure is a UsageError naming the
recipe key, the import path and what was found. The launcher imports the targets before anything is
started (`check_imports`); the types of what factories return are checked at rank start.
"""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from jobs.schema.errors import ConfigError
from jobs.schema.recipe import RecipeConfig


def resolve(src: str, key: str, target: str) -> Callable[..., Any]:
    """The callable `target` ("module.path:attr.path") names; `src` and `key` say where it was written."""
    module_name, _, attr_path = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise _error(src, key, target, f"cannot import {module_name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module raised while it was imported
        raise _error(src, key, target, f"importing {module_name} raised {type(err).__name__}: {err}") from None
    where = module_name
    for attr in attr_path.split("."):
        if not hasattr(found, attr):
            raise _error(src, key, target, f"{_kind(found)} {where} has no attribute {attr!r}")
        found, where = getattr(found, attr), f"{where}.{attr}"
    if not callable(found):
        raise _error(src, key, target, f"{where} is not callable (of type {type(found).__name__})")
    return found


def _kind(obj: Any) -> str:
    return "module" if type(obj).__name__ == "module" else type(obj).__name__


IMPORT_HINT = "check the import path and that its package is importable from the launch directory"


def _error(src: str, key: str, target: str, found: str, hint: str = IMPORT_HINT) -> ConfigError:
    return ConfigError(src, key, f"{target!r} \u2014 {found}", hint)


def recipe_targets(recipe: RecipeConfig) -> dict[str, str]:
    """Every import path a recipe names, by the key that names it (built-in entries included)."""
    model_key = "model.target" if recipe.model.target else "model.name"
    data_key = "data.target" if recipe.data.target else "data.name"
    found = {model_key: recipe.model.factory, data_key: recipe.data.factory, "loss.target": recipe.loss.target}
    found.update({f"metrics.{name}": path for name, path in recipe.eval_metrics.items()})
    if recipe.parallel.tp_plan is not None:
        found["parallel.tp_plan"] = recipe.parallel.tp_plan
    return found


def check_imports(recipe: RecipeConfig, src: str, code_dir: Optional[Path] = None) -> None:
    """Import every target a recipe names (with `code_dir` first on the import path, as on the ranks)."""
    with on_import_path(code_dir):
        for key, target in recipe_targets(recipe).items():
            resolve(src, key, target)


@contextmanager
def on_import_path(code_dir: Optional[Path]) -> Iterator[None]:
    """`code_dir` first on sys.path for the duration (the launcher's own path is left as it was)."""
    if code_dir is None:
        yield
        return
    sys.path.insert(0, str(code_dir))
    try:
        yield
    finally:
        sys.path.remove(str(code_dir))


def checked_module(src: str, key: str, target: str, value: Any) -> Any:
    """What a model factory returned, if it is an nn.Module."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise _error(src, key, target, f"returned {type(value).__name__}, not an nn.Module",
                     "a model factory returns a torch.nn.Module")
    return value


DATA_HINT = "a data factory returns (train_dataset, val_dataset), e.g. two torch.utils.data.TensorDataset"


def checked_datasets(src: str, key: str, target: str, value: Any) -> tuple[Any, Any]:
    """What a data factory returned, if it is a (train, validation) pair of sized, indexable data sets."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _error(src, key, target, f"returned {type(value).__name__}, not a (train, validation) pair",
                     DATA_HINT)
    for i, part in enumerate(value):
        if not (hasattr(part, "__len__") and hasattr(part, "__getitem__")):
            raise _error(src, key, target, f"returned {type(part).__name__} as the {('train', 'validation')[i]} "
                         "data set: it needs __len__ and __getitem__", DATA_HINT)
    return value[0], value[1]
