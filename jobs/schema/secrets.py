"""Secrets never leave the process: what is shown or stored is redacted, the job still gets the value.

What counts as a secret:
- the value of a mapping key that looks like a credential (`WANDB_API_KEY`, `AWS_SECRET_ACCESS_KEY`,
  `HF_TOKEN`, `DB_PASSWORD`, ...), e.g. in `slurm.env`;
- the user info of a URL (`https://user:token@host/...`), e.g. in `storage.endpoint_url` or
  `model.pretrained`;
- the value of a URL query parameter that looks like a credential (`?token=...`, `X-Amz-Signature=...`);
- in a command line (a script's `script.args`, `script.resume_args`: `ARGUMENT_LISTS`), the value of a
  long option named like a credential: `--password=VALUE`, or `--api-key VALUE` (the next argument,
  unless it starts with `-`: argparse would take that for an option of its own).

A run directory keeps `config.yaml` and `cluster.yaml` redacted (they are read, copied and pasted);
the real values of the redacted fields go to `secrets.yaml` beside them, created with mode 0600 and
only when there is something to keep. `overlay()` puts them back when a rank loads its config.
Logs go through `RedactFilter`, which replaces every secret value of the run's configs.
Every file that may hold a real value is written by `write_private` (0600, replacing, never following,
whatever was at its path).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

MASK = "***"
SECRETS_FILE = "secrets.yaml"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|SIGNATURE", re.IGNORECASE)
# Both patterns start only where a match can begin (after a character that cannot continue a scheme; a
# name that holds no separator): without that, a long run of letters or of `;` was scanned again from each
# of its characters, quadratic (40,000 letters in one script argument took 50 s).
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#@\s]+)@")
_QUERY = re.compile(r"(?P<name>[?&;][^=&#;?\s]*)=(?P<value>[^&#\s]+)")
_LONG_OPTION = re.compile(r"(?P<flag>--[^=\s]+)(?:=(?P<value>.*))?", re.DOTALL)
# where a recipe holds command lines: a list whose items are one process's arguments
ARGUMENT_LISTS: tuple[tuple[str, ...], ...] = (("script", "args"), ("script", "resume_args"))

KeyPath = tuple[str, ...]  # where a value sits in a config tree, e.g. ("slurm", "env", "WANDB_API_KEY")


def is_secret_key(name: str) -> bool:
    """A mapping key or query parameter whose value is a credential."""
    return bool(_SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    """URL user info and credential-like query values in free text -> `***`."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}" if is_secret_key(m["name"]) else m[0], text)


def is_secret_value(text: str) -> bool:
    """A value that holds a credential whatever key it sits under (a URL's user info, `?token=`)."""
    return redact_text(text) != text


def is_secret_entry(key: str, value: Any) -> bool:
    """An environment entry (`slurm.env`, `skypilot.env`, ...) never written into a script or task file."""
    return is_secret_key(key) or (isinstance(value, str) and is_secret_value(value))


def redact_args(args: Sequence[str]) -> list[str]:
    """A command line as it may be shown or stored: URL secrets and secret options' values -> `***`."""
    shown, value_next = [], False
    for arg in args:
        option = _LONG_OPTION.fullmatch(arg)
        if value_next and not arg.startswith("-"):
            shown.append(MASK)
        elif option and option["value"] is not None and is_secret_key(option["flag"]):
            shown.append(f"{option['flag']}={MASK}")
        else:
            shown.append(redact_text(arg))
        value_next = bool(option) and option["value"] is None and is_secret_key(option["flag"])
    return shown


def redact_override(item: str) -> str:
    """`key=value` as shown: the whole value of a credential-named key, URL secrets in any other."""
    key, eq, value = item.partition("=")
    return f"{key}={MASK}" if eq and value and is_secret_key(key.rsplit(".", 1)[-1]) else redact_text(item)


def split(tree: Any) -> tuple[Any, list[tuple[KeyPath, Any]]]:
    """(the tree with secrets masked, [(path, real value)] for every leaf that was changed)."""
    found: list[tuple[KeyPath, Any]] = []

    def walk(node: Any, path: KeyPath) -> Any:
        if isinstance(node, dict):
            return {k: _masked_leaf(v, path + (str(k),)) if _is_secret_leaf(k, v) else walk(v, path + (str(k),))
                    for k, v in node.items()}
        if isinstance(node, (list, tuple)) and path in ARGUMENT_LISTS and all(isinstance(v, str) for v in node):
            masked = redact_args(node)
            found.extend((path + (str(i),), v) for i, v in enumerate(node) if masked[i] != v)
            return masked
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
            option = _LONG_OPTION.fullmatch(text)
            if option and option["value"] is not None and is_secret_key(option["flag"]):  # --password=VALUE
                text = option["value"]
            if redact_text(text) == text:  # the value of a credential-named key or option: all of it
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
    """Create or replace a file readable by its owner only: a new file (mkstemp: 0600 from the start,
    O_EXCL, so no planted file or link is written through) renamed over `path`, which replaces whatever
    was there (a 0644 file, a symlink) instead of writing into it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
