"""Tier 1, property-based: whatever a recipe file, a cluster config or an override holds, the loader builds a
config or raises ConfigError with one short line (and an optional HINT line); never another exception, never a
traceback, never a file written. Each property runs 500 derandomized examples, so CI sees the same ones."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_cli
from jobs.schema import (RECIPES_DIR, ClusterConfig, RecipeConfig, SlurmConfig, StorageConfig, load_cluster,
                    load_recipe, load_resolved)
from jobs.schema.errors import ConfigError

MAX_MESSAGE = 600  # a first line of at most 320 characters, a hint of at most 240
TOOL_CACHES = {".hypothesis", ".pytest_cache"}  # written by the test tools themselves, never by the loader
FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


RECIPE_SECTIONS = {f.name: _fields(f.default_factory) for f in dataclasses.fields(RecipeConfig)
                   if f.default_factory is not dataclasses.MISSING}
CLUSTER_SECTIONS = {"storage": _fields(StorageConfig), "slurm": _fields(SlurmConfig)}
RECIPE_KEYS = sorted(f"{s}.{k}" for s, keys in RECIPE_SECTIONS.items() for k in keys)
CLUSTER_KEYS = sorted({f"{s}.{k}" for s, keys in CLUSTER_SECTIONS.items() for k in keys} | set(_fields(ClusterConfig)))
DIGITS = yaml.safe_load((RECIPES_DIR / "digits.yaml").read_text())

# Pieces of YAML that have broken loaders: aliases, tags, merge keys, flow and block collections, tabs,
# numbers that are not numbers, control characters, document markers, and very long tokens.
FRAGMENTS = ["a: ", "trainer: ", "epochs: ", "optim: ", "lr: ", "slurm: ", "env: ", "&x ", "*x", "&y ", "*y",
             "[", "]", "{", "}", ", ", "\n", "  ", "- ", "? ", ": ", "<<: ", "!!python/object/apply:os.system ",
             "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!bool ", "!!set ", "!x ", ".nan", ".inf", "-.inf",
             "1e999", "2001-13-01", "0x1F", "1_000", "on", "null", "~", "\t", "'", '"', "# c", "---\n", "...\n",
             "%YAML 1.1\n", "\x00", "\x1b", "\u2028", "\ufeff", "é", "9" * 5000, "x" * 2000, "\\", "|\n", ">\n"]

plausible = st.one_of(st.integers(min_value=-2, max_value=300), st.floats(min_value=-0.5, max_value=2.0),
                      st.sampled_from([0, 1, 2, 8, 32, 64, 0.0, 0.5, 0.999, 1.0, 1e-3]))
scalars = st.one_of(
    plausible, plausible, st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 2**31, 2**32, 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", " ", "nan", "-inf", "1e999", "vgg", "vgg11", "cnn", "sgd", "adamw", "ddp", "digits",
                     "synthetic", "slurm", "local", "s3://b/p", "http://u:p@h", "x" * 5000]),
)
keys = st.one_of(st.sampled_from(sorted({k for fs in RECIPE_SECTIONS.values() for k in fs})), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=16)
field_values = st.one_of(scalars, scalars, scalars, st.lists(scalars, max_size=3), values)  # mostly scalars


def _sections(sections: dict[str, list[str]], top: list[str]) -> st.SearchStrategy[dict]:
    """Documents shaped like the real thing, so that the range checks behind the type checks are reached."""
    one = {name: st.dictionaries(st.sampled_from(fields), field_values, max_size=3)
           for name, fields in sections.items()}
    return st.fixed_dictionaries({}, optional={**one, **{key: scalars for key in top}})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


recipe_sections = _sections(RECIPE_SECTIONS, ["name", "description"])
recipe_documents = st.one_of(recipe_sections, recipe_sections.map(lambda d: _merge(DIGITS, d)))
cluster_documents = _sections(CLUSTER_SECTIONS, ["name", "backend", "runs_dir"])
yaml_texts = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join), st.text(max_size=200))
file_bytes = st.one_of(st.binary(max_size=300), yaml_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
                       yaml_texts.map(lambda t: t.encode("latin-1", "replace")))


def _overrides(dotted_keys: list[str]) -> st.SearchStrategy[list[str]]:
    """Mostly `known.key=value`, some of them YAML fragments, and now and then anything at all."""
    typed = st.tuples(st.sampled_from(dotted_keys), field_values.map(_flow)).map("=".join)
    fragments = st.tuples(st.sampled_from(dotted_keys), yaml_texts).map("=".join)
    anything = st.text(max_size=60)
    return st.lists(st.one_of(typed, typed, typed, fragments, fragments, anything), max_size=3)
loaders: list[Callable[[Path], Any]] = [
    lambda p: load_recipe(str(p)), lambda p: load_cluster(str(p)), lambda p: load_resolved(p, RecipeConfig)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _loads_or_refuses_cleanly(load: Callable[[], Any], folder: Path) -> None:
    """The property: a config, or one ConfigError line (+ HINT) of bounded length; and no file written."""
    repo_before = set(os.listdir(REPO)) - TOOL_CACHES
    try:
        load()
    except ConfigError as err:
        text = str(err)
        lines = text.splitlines()
        assert len(text) <= MAX_MESSAGE and 1 <= len(lines) <= 2, text
        assert len(lines) == 1 or lines[1].startswith("  HINT: "), text
    assert sorted(os.listdir(folder)) == ["r.yaml"]
    assert set(os.listdir(REPO)) - TOOL_CACHES == repo_before


@FUZZ
@given(doc=recipe_documents)
def test_any_recipe_document(folder: Path, doc: dict) -> None:
    (folder / "r.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    _loads_or_refuses_cleanly(lambda: load_recipe(str(folder / "r.yaml")), folder)


@FUZZ
@given(doc=cluster_documents)
def test_any_cluster_document(folder: Path, doc: dict) -> None:
    (folder / "r.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    _loads_or_refuses_cleanly(lambda: load_cluster(str(folder / "r.yaml")), folder)


@FUZZ
@given(content=file_bytes, load=st.sampled_from(loaders))
def test_any_file_content(folder: Path, content: bytes, load: Callable[[Path], Any]) -> None:
    (folder / "r.yaml").write_bytes(content)
    _loads_or_refuses_cleanly(lambda: load(folder / "r.yaml"), folder)


@FUZZ
@given(recipe_items=_overrides(RECIPE_KEYS), cluster_items=_overrides(CLUSTER_KEYS))
def test_any_overrides(folder: Path, recipe_items: list[str], cluster_items: list[str]) -> None:
    (folder / "r.yaml").write_text(yaml.safe_dump(DIGITS))
    _loads_or_refuses_cleanly(lambda: load_recipe(str(folder / "r.yaml"), recipe_items), folder)
    _loads_or_refuses_cleanly(lambda: load_cluster("local_slurm", cluster_items), folder)


# ----------------------------------------------------------------------------- through the real CLI
BOMB = ("description:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))


@pytest.mark.parametrize("content, overrides, words", [
    (BOMB.encode(), [], "more than 10000 values once aliases are expanded"),
    ("description: café\n".encode("latin-1"), [], "not UTF-8: byte 0xe9 at offset 16"),
    (None, ["optim.lr=.nan"], "optim.lr: nan is not a finite number"),
    (b"trainer:\n  epochs: 1\n  epochs: 2\n", [], "trainer.epochs: duplicate key (lines 2 and 3)"),
], ids=["alias-bomb", "latin-1", "nan-override", "duplicate-key"])
def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path, runs_dir: Path, content: bytes | None,
                                               overrides: list[str], words: str) -> None:
    recipe = "digits"
    if content is not None:
        recipe = str(tmp_path / "r.yaml")
        Path(recipe).write_bytes(content)
    proc = run_cli("launch", recipe, *overrides, runs_dir=runs_dir, timeout=30)  # the bomb once took 18.7 s
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert [line for line in lines if line.startswith("error:")] == lines[:1] and words in lines[0]
    assert len(lines) <= 2 and all(line.startswith("  HINT: ") for line in lines[1:])
    assert list(runs_dir.iterdir()) == []
