"""Secrets never leave the process: what is shown or stored is redacted, the job still gets the value.

What counts as a secret:
- the value of a mapping key that looks like a credential (`WANDB_API_KEY`, `AWS_SECRET_ACCESS_KEY`,
  `HF_TOKEN`, `DB_PASSWORD`, ...), e.g. in `slurm.env`;
- the user info of a URL (`https://user:token@host/...`), e.g. in `storage.endpoint_url` or
  `model.pretrained`;
- the value of a URL query parameter that looks like a credential (`?token=...`, `X-Amz-Signature=...`).

A run directory keeps `config.yaml` and `cluster.yaml` redacted (they are read, copied and pasted);
the real values of the redacted fields go to `secrets.yaml` beside them, created with mode 0600 and
only when there is something to keep. `overlay()` puts them back when a rank loads its config.
Logs go through `RedactFilter`, which replaces every secret value of the run's configs.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

MASK = "***"
SECRETS_FILE = "secrets.yaml"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|SIGNATURE", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#@\s]+)@")
_QUERY = re.compile(r"(?P<name>[?&;][^=&#\s]*)=(?P<value>[^&#\s]+)")

KeyPath = tuple[str, ...]  # where a value sits in a config tree, e.g. ("slurm", "env", "WANDB_API_KEY")


def is_secret_key(name: str) -> bool:
    """A mapping key or query parameter whose value is a credential."""
    return bool(_SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    """URL user info and credential-like query values in free text -> `***`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}" if is_secret_key(m["name"]) else m[0], text)


def split(tree: Any) -> tuple[Any, list[tuple[KeyPath, Any]]]:
    """(the tree with secrets masked, [(path, real value)] for every leaf that was changed)."""
    found: list[tuple[KeyPath, Any]] = []

    def walk(node: Any, path: KeyPath) -> Any:
        if isinstance(node, dict):
            return {k: _masked_leaf(v, path + (str(k),)) if _is_secret_leaf(k, v) else walk(v, path + (str(k),))
                    for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, path + (str(i),)) for i, v in enumerate(node)]
        if isinstance(node, str) and redact_text(node) != node:
            found.append((path, node))
            return redact_text(node)
        return node

    def _masked_leaf(value: Any, path: KeyPath) -> str:
        found.append((path, value))
        return MASK

    return walk(tree, ()), found


def redact(tree: Any) -> Any:
    return split(tree)[0]


def _is_secret_leaf(key: Any, value: Any) -> bool:
    return isinstance(key, str) and is_secret_key(key) and isinstance(value, (str, int, float)) \
        and not isinstance(value, bool) and value != ""


def secret_values(trees: Iterable[Any]) -> set[str]:
    """Every string a log line must not show: whole secret values and the parts a URL hides."""
    values: set[str] = set()
    for tree in trees:
        for _, value in split(tree)[1]:
            text = str(value)
            if redact_text(text) == text:  # the value of a credential-named key: all of it
                values.add(text)
                continue
            for m in _USERINFO.finditer(text):  # a URL: only the parts it hides
                values.update({m["info"], m["info"].partition(":")[2]})
            values.update(m["value"] for m in _QUERY.finditer(text) if is_secret_key(m["name"]))
    return {v for v in values if len(v) >= 4}  # masking "1" everywhere would hide more than it protects


# ----------------------------------------------------------------------------- run directory files
def write_configs(run_dir: Path, trees: dict[str, Any]) -> None:
    """`{"config.yaml": recipe dict, ...}` -> redacted files, plus secrets.yaml (0600) when needed."""
    kept: dict[str, list[dict[str, Any]]] = {}
    for filename, tree in trees.items():
        masked, found = split(tree)
        (run_dir / filename).write_text(yaml.safe_dump(masked, sort_keys=False))
        if found:
            kept[filename] = [{"path": list(path), "value": value} for path, value in found]
    path = run_dir / SECRETS_FILE
    if kept:
        write_private(path, yaml.safe_dump(kept, sort_keys=False))
    else:
        path.unlink(missing_ok=True)  # a relaunch without secrets leaves none behind


def write_private(path: Path, text: str) -> None:
    """Create or replace a file readable by its owner only (mode 0600 from the start, no window)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)


def overlay(config_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Put the real values from secrets.yaml back into a redacted config read from `config_path`."""
    path = config_path.parent / SECRETS_FILE
    if not path.is_file():
        return data
    entries = (yaml.safe_load(path.read_text()) or {}).get(config_path.name, [])
    for entry in entries:
        _set(data, entry["path"], entry["value"])
    return data


def _set(tree: Any, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


class RedactFilter(logging.Filter):
    """Masks secret values (and any URL user info) in every record that passes a handler."""

    def __init__(self, values: Iterable[str]) -> None:
        super().__init__()
        self._values = sorted(set(values), key=len, reverse=True)  # longest first: no partial leftovers

    def mask(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return redact_text(text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
        return True
