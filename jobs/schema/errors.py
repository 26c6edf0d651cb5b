"""User-facing errors: each names where the problem is and what to do; the CLI turns them into exit code 2."""
from __future__ import annotations

import re
import reprlib
from typing import Any

# A message is one line (plus an optional HINT line) of bounded length, whatever a file or the command line
# held: a key of 80 MB or a newline in a path must not flood the terminal or fake a second message.
# A ConfigError's line is `SOURCE: KEY: PROBLEM`. The problem says what is wrong (values in it are already
# bounded by short()) and the key where: both are shown whole. What gives way when the line is long is the
# source, a file's path (cut in the middle: its folders go, its file name stays) and the override list (cut
# at its end). Only a problem that alone nearly fills a line is cut, at its end.
_LINE_CHARS, _KEY_CHARS, _HINT_CHARS = 350, 80, 240
_SOURCE_MIN_CHARS = 30  # what a source keeps whatever the rest of the line needs: ".../recipes/x.yaml"
_PATH_MIN_CHARS, _OVERRIDES_MIN_CHARS = 20, 40  # what each part of a source keeps while the other gives way
_WITH_OVERRIDES = re.compile(r"(.*?) \(with overrides (.*)\)", re.DOTALL)  # jobs.schema.files' sources
PATH_CHARS = 200  # an absolute path in a message: shorten_path() keeps its file name


class UsageError(Exception):
    """Bad input from the user (a file, a key, a value). Nothing has been started when this is raised.

    The message is one line; `hint` says what to do and is shown on a second line.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        self.hint = hint
        super().__init__(f"{message}\n  HINT: {one_line(hint, _HINT_CHARS)}" if hint else message)


class ConfigError(UsageError):
    """A config file or override holds something invalid."""

    def __init__(self, source: str, key: str, message: str, hint: str = "") -> None:
        self.source, self.key, self.message, self.hint = source, key, message, hint
        super().__init__(config_line(source, key, message), hint)


def config_line(source: str, key: str, message: str) -> str:
    """`SOURCE: KEY: MESSAGE` on one line of at most _LINE_CHARS characters: the source is shortened first
    (shorten_source), the key and the message only when they alone would not fit."""
    key, message = one_line(key, _KEY_CHARS), one_line(message, _LINE_CHARS)
    rest = f": {key}: {message}" if key else f": {message}"
    line = shorten_source(source, max(_LINE_CHARS - len(rest), _SOURCE_MIN_CHARS)) + rest
    return line if len(line) <= _LINE_CHARS else line[:_LINE_CHARS - 3] + "..."


def one_line(text: str, limit: int) -> str:
    """`text` with control characters escaped (a newline becomes `\\n`), cut to `limit` characters."""
    text = text[:limit + 1]  # escaping only ever lengthens: no need to look further
    shown = _printable(text)
    return shown if len(shown) <= limit else shown[:max(limit - 3, 0)] + "..."


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def shorten_path(path: str, limit: int = PATH_CHARS) -> str:
    """`path` on one line of at most `limit` characters, cut in the middle: its start and, above all, its end
    (the file's name and the folders just above it) stay. `/very/long/.../recipes/x.yaml`."""
    if len(path) <= limit:
        shown = _printable(path)
        if len(shown) <= limit:
            return shown
    keep = max(limit - 3, 2)
    tail_n = max(keep * 2 // 3, keep - 40)  # the end says which file; the start, which tree
    head_n = keep - tail_n
    head, tail = _printable(path[:head_n])[:head_n], _printable(path[-tail_n:])[-tail_n:]
    cut = head.rfind("/")
    if cut >= head_n // 2:  # whole folder names where that loses little
        head = head[:cut + 1]
    cut = tail.find("/")
    if 0 <= cut <= tail_n // 2:
        tail = tail[cut:]
    return f"{head}...{tail}"


def short_path(path: Any, limit: int = PATH_CHARS) -> str:
    """A path quoted as short() quotes it (repr), but a long one cut in the middle (shorten_path), so that
    the file's name stays in view."""
    text = str(path)
    shown = repr(text[:limit])
    return shown if len(text) <= limit and len(shown) <= limit else f"'{shorten_path(text, limit - 2)}'"


def shorten_source(source: str, limit: int) -> str:
    """Where a value came from (a path, or `PATH (with overrides A=1 B=2)`), in at most `limit` characters:
    the override list gives way first (cut at its end, to _OVERRIDES_MIN_CHARS), then the path (shorten_path,
    to _PATH_MIN_CHARS), then the override list again (down to `...`)."""
    found = _WITH_OVERRIDES.fullmatch(source)
    if found is None:
        return shorten_path(source, max(limit, _PATH_MIN_CHARS))
    path, given = found.groups()
    frame = len(" (with overrides )")
    path_shown = shorten_path(path, max(limit, _PATH_MIN_CHARS))
    given_shown = one_line(given, max(limit - frame - len(path_shown), min(len(given), _OVERRIDES_MIN_CHARS), 3))
    if len(path_shown) + frame + len(given_shown) > limit:
        path_shown = shorten_path(path, max(limit - frame - len(given_shown), _PATH_MIN_CHARS))
    if len(path_shown) + frame + len(given_shown) > limit:
        given_shown = one_line(given, max(limit - frame - len(path_shown), 3))
    return f"{path_shown} (with overrides {given_shown})"


class _ShortRepr(reprlib.Repr):
    """reprlib that also survives ints too long for str() (Python refuses more than 4300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        return super().repr_int(x, level) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"


_REPR = _ShortRepr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3


def short(value: Any, limit: int = 80) -> str:
    """repr() of a value for an error message, cut to `limit` characters without building the full repr
    (repr also makes newlines and undecodable bytes visible); a cut string says how long it was."""
    if isinstance(value, str):
        text = repr(value[:limit])  # the start of a name or path is what a person recognises
        return text if len(value) <= limit and len(text) <= limit else \
            f"{text[:limit - 3]}... ({len(value)} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
