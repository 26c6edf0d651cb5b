"""Config files: lookup by name, command-line overrides, one loader for recipes and cluster configs,
and the resolved YAML written to (and read back from) a run directory."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jobs.schema import secrets
from jobs.schema.build import build
from jobs.schema.cluster import ClusterConfig
from jobs.schema.errors import ConfigError, one_line, short, short_path
from jobs.schema.recipe import RecipeConfig
from jobs.schema.safe_yaml import MAX_OVERRIDE_CHARS, parse_yaml, read_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Installed as a wheel, the built-in configs are data files under <prefix>/share/launcher (pyproject.toml);
# in a checkout (editable install) they are the repository's own folders.
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "launcher"


def _built_in(folder: str) -> Path:
    here = REPO_ROOT / folder
    return here if here.is_dir() else INSTALLED_CONFIGS / folder


RECIPES_DIR = _built_in("recipes")
CLUSTERS_DIR = _built_in("cluster_configs")

def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`trainer.epochs=2 optim.lr=1e-3` -> nested dict; values are parsed as YAML (bad syntax: a string)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError("command line", item, "an override must look like section.key=value",
                              "e.g. trainer.epochs=2")
        key, raw = item.split("=", 1)
        if len(raw) > MAX_OVERRIDE_CHARS:
            raise ConfigError("command line", key, f"value longer than {MAX_OVERRIDE_CHARS} characters",
                              "put it in a recipe file")
        try:
            value = parse_yaml(raw, "command line", key) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("command line", key, "conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# What each kind of config is called in messages and where its built-in ones are.
KINDS: dict[type, tuple[str, Path]] = {RecipeConfig: ("recipe", RECIPES_DIR),
                                       ClusterConfig: ("cluster config", CLUSTERS_DIR)}
C = TypeVar("C", RecipeConfig, ClusterConfig)


def search_path(cls: type) -> list[Path]:
    """Where configs of this kind are looked up by name: `./recipes` (or `./cluster_configs`) of the
    directory the command runs in first, so a user's project can add and shadow configs; then the
    built-in ones."""
    built_in = KINDS[cls][1]
    here = Path.cwd() / built_in.name
    return [built_in] if here.resolve() == built_in.resolve() else [here, built_in]


def find_config(name: str, folders: list[Path], kind: str) -> Path:
    """A name (`digits`) is looked up in `folders` (recursively, the first folder holding it wins);
    anything with a slash or .yaml is a path.

    The name is compared with file stems, never used as a glob pattern: `*` or `[ab]` is an unknown name.
    """
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path, where = Path(name), name if name.isprintable() and len(name) <= 80 else short_path(name, 80)
        try:
            found = path.is_file()
        except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
            raise ConfigError(where, "", f"cannot read {kind} file: {getattr(err, 'strerror', None) or err}") from None
        if not found:
            raise ConfigError(where, "", f"{kind} file not found")
        return path
    known: set[str] = set()
    for folder in folders:
        files = sorted(folder.rglob("*.yaml")) if folder.is_dir() else []
        matches = [p for p in files if p.stem == name]
        if matches:
            return matches[0]
        known.update(p.stem for p in files)
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(", ".join(map(str, folders)), "", f"unknown {kind} {short(name)}",
                      f"{hint}known {kind}s: {', '.join(sorted(known))}")


def load(cls: type[C], name: str, overrides: list[str] = ()) -> C:
    """Find `name` (a file stem or a path), apply `key=value` overrides, build and check it."""
    path = find_config(name, search_path(cls), KINDS[cls][0])
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    return from_document(cls, data, _source(path, overrides), overrides)


def from_document(cls: type[C], data: dict[str, Any], src: str, overrides: list[str] = ()) -> C:
    """A config from a YAML document (a file's, or one a command made), with `overrides`, checked
    (`src` names it in errors)."""
    cfg = build(cls, _merge(data, parse_overrides(list(overrides))), src)
    cfg.check(src)
    return cfg


def load_recipe(name: str, overrides: list[str] = ()) -> RecipeConfig:
    return load(RecipeConfig, name, overrides)


def load_cluster(name: str = "local", overrides: list[str] = ()) -> ClusterConfig:
    return load(ClusterConfig, name, overrides)


def _source(path: Path, overrides: list[str]) -> str:
    """Where a value came from, for errors. A long override list is cut here to a first glance (errors.py's
    ConfigError shortens it further, and the path in the middle, when the key and the problem need the room).
    Masked before it is cut: a URL cut before its `@` no longer looks like one to the error's redaction."""
    given = one_line(" ".join(secrets.redact_override(o) for o in overrides), 60)
    return f"{path} (with overrides {given})" if overrides else str(path)


def to_dict(cfg: Any) -> dict:
    """Plain dict (lists instead of tuples) for YAML/JSON output."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


# What a script run reads of its recipe (jobs.script, the runtime API, the backends): the rest is the built-in
# trainer's. Of `parallel`, only the layout: strategy, FSDP and pipeline keys shape the trainer's model.
SCRIPT_SECTIONS = ("name", "description", "script", "code_dir", "parallel", "checkpoint", "logging")
LAYOUT = ("nodes", "procs_per_node")


def recipe_document(recipe: RecipeConfig) -> dict:
    """The recipe as a run's config.yaml and `launcher show` give it. A script run's leaves out what it
    does not use and left at its default (model: cnn, data: digits, optim, ... would say it trains a CNN on
    digits): a key left out builds as its default, so the file loads back to the same recipe (and hash)."""
    tree = to_dict(recipe)
    if recipe.script is None:
        return tree
    default = to_dict(RecipeConfig(name=recipe.name))
    kept = {k: v for k, v in tree.items() if k in SCRIPT_SECTIONS or v != default[k]}
    kept["parallel"] = {k: v for k, v in tree["parallel"].items() if k in LAYOUT or v != default["parallel"][k]}
    return kept


def to_yaml(cfg: Any, redacted: bool = False) -> str:
    """YAML of a config; `redacted` masks credentials (for anything a person sees)."""
    tree = to_dict(cfg)
    return yaml.safe_dump(secrets.redact(tree) if redacted else tree, sort_keys=False)


def config_hash(cfg: Any) -> str:
    """Top-level keys left unset (None) do not count: an optional section added later keeps the
    hashes, and so the default run names, of configs that do not use it."""
    tree = {k: v for k, v in to_dict(cfg).items() if v is not None}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def load_resolved(path: Path, cls: type) -> Any:
    """Reload a resolved config written to a run directory (validated again: it may have been edited),
    with the real values of its redacted secrets put back."""
    cfg = build(cls, secrets.overlay(path, read_yaml(path)), str(path))
    cfg.check(str(path))
    return cfg
