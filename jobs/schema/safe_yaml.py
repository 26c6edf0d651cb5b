"""Reading config YAML safely: a hostile or broken file fails in milliseconds with one line.

PyYAML's safe loader (no Python tags), bounded: file size, values once aliases are expanded, nesting
depth; duplicate keys and keys that are not strings are refused naming the key and both lines; every
exception a constructor raises becomes a ConfigError.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from jobs.schema.errors import ConfigError, short


# Limits far above any real config, so that a hostile or broken file fails in milliseconds with one line.
_MAX_FILE_BYTES = 256 << 10  # recipes are a few hundred bytes; PyYAML scans ~0.5 MB/s
MAX_OVERRIDE_CHARS = 64 << 10
_MAX_VALUES = 10_000  # values, aliases expanded: a 478-byte "billion laughs" holds 10**9; PyYAML: ~50 us each
_MAX_DEPTH = 64  # nesting levels
_STR_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounding its work and turning the plain exceptions of constructors into YAML errors."""

    def __init__(self, text: str, src: str, prefix: str) -> None:
        super().__init__(text)
        # names of our own: PyYAML's mixins use plain ones such as `prefix` and `index`
        self._src, self._path, self._composed, self._nesting = src, prefix, 0, 0

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> yaml.Node:
        # Checked while composing, before the graph exists: PyYAML recurses once per level of nesting (deep
        # input would end in a RecursionError) and takes ~50 us per value (a 1 MiB list would take a minute).
        self._composed, self._nesting = self._composed + 1, self._nesting + 1
        if self._composed > _MAX_VALUES or self._nesting > _MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            what = f"more than {_MAX_VALUES} values" if self._composed > _MAX_VALUES \
                else f"nested more than {_MAX_DEPTH} levels deep"
            raise ConfigError(self._src, self._path, f"line {line}: {what}", "a config needs a few dozen values")
        node = super().compose_node(parent, index)
        self._nesting -= 1
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception:  # noqa: BLE001 - PyYAML lets out whatever Python raises on a bad scalar:
            # ValueError (`2001-13-01`, an int of 5000 digits), KeyError (`!!bool x`), IndexError (`!!int ''`)
            what = short(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"{what} is not a valid {node.tag.rsplit(':', 1)[-1]}", node.start_mark) from None


def parse_yaml(text: str, src: str, prefix: str = "") -> Any:
    """One YAML document, checked before it is built; raises yaml.YAMLError for bad syntax, ConfigError else.

    The check walks the composed node graph (an alias is a shared node there: nothing is expanded yet), so
    duplicate keys, keys that are not strings, alias bombs and deep nesting are refused naming key and line.
    """
    loader = _Loader(text, src, prefix)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, prefix, 0, {}, src)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _measure(node: yaml.Node, path: str, depth: int, seen: dict[yaml.Node, Optional[tuple[int, int]]],
             src: str) -> tuple[int, int]:
    """(values, height) of `node` with aliases expanded; `seen` measures each shared node once."""
    if node in seen:
        if seen[node] is None:
            raise ConfigError(src, path, f"line {node.start_mark.line + 1}: an alias refers to a value that "
                              "contains it", "YAML anchors must not be recursive in a config")
        values, height = seen[node]
        _check_depth(depth + height, path, src)
        return values, height
    _check_depth(depth, path, src)
    seen[node] = None  # open: meeting it again below means a recursive alias
    values, height = 1, 0
    for child_path, child in _children(node, path, src):
        child_values, child_height = _measure(child, child_path, depth + 1, seen, src)
        values, height = values + child_values, max(height, child_height + 1)
        if values > _MAX_VALUES:
            raise ConfigError(src, path, f"more than {_MAX_VALUES} values once aliases are expanded",
                              "a config needs a few dozen: remove the nested aliases (*name)")
    seen[node] = (values, height)
    return values, height


def _check_depth(depth: int, path: str, src: str) -> None:
    if depth > _MAX_DEPTH:
        raise ConfigError(src, path, f"nested more than {_MAX_DEPTH} levels deep")


def _children(node: yaml.Node, path: str, src: str) -> typing.Iterator[tuple[str, yaml.Node]]:
    """A collection's values with their dotted paths; mapping keys must be distinct strings."""
    if isinstance(node, yaml.SequenceNode):
        yield from ((f"{path}[{i}]", child) for i, child in enumerate(node.value))
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *base` overrides keys on purpose
            yield path, value_node
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
            what = f"{short(key_node.value)} (read as {key_node.tag.rsplit(':', 1)[-1]})" \
                if isinstance(key_node, yaml.ScalarNode) else "that is a list or mapping"
            raise ConfigError(src, path, f"line {line}: key {what} is not a string",
                              "keys are names: quote it (\"1\": ...) or fix the indentation")
        key = key_node.value
        if key in first_line:
            raise ConfigError(src, _join(path, key), f"duplicate key (lines {first_line[key]} and {line})",
                              "keep one of them: YAML would silently use the last")
        first_line[key] = line
        yield _join(path, key), value_node


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """PyYAML's error as `line L, column C: problem`, without its multi-line excerpt of the file."""
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        code = err.character if isinstance(err.character, int) else ord(err.character)
        return f"line {line}: character U+{code:04X} is not allowed in YAML"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{where}{err.problem or err.context}{context}"
    return type(err).__name__


def _read_text(path: Path) -> str:
    """A config file's text: at most 256 KiB of UTF-8, every failure a ConfigError naming the file."""
    try:
        if not path.is_file():
            raise ConfigError(str(path), "", "file not found")
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as err:  # unreadable, a name too long, a NUL byte in the name
        raise ConfigError(str(path), "", f"cannot read the file: {getattr(err, 'strerror', None) or err}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(str(path), "", f"larger than {_MAX_FILE_BYTES >> 10} KiB",
                          "a config is a few hundred bytes: is this the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), "", f"not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start}",
                          "save the file as UTF-8") from None


def read_yaml(path: Path) -> dict:
    """A config file's top-level mapping ({} for an empty file); every problem a one-line ConfigError."""
    text = _read_text(path)
    try:
        data = parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", f"malformed YAML: {_yaml_problem(err, text)}",
                          "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
