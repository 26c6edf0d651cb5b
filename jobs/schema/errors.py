"""User-facing errors: each names where the problem is and what to do; the CLI turns them into exit code 2."""
from __future__ import annotations

import reprlib
from typing import Any

# A message is one line (plus an optional HINT line) of bounded length, whatever a file or the command line
# held: a key of 80 MB or a newline in a path must not flood the terminal or fake a second message.
_SOURCE_CHARS, _KEY_CHARS, _LINE_CHARS, _HINT_CHARS = 160, 80, 320, 240
PATH_CHARS = 200  # an absolute path in a message: short()'s 80 would cut off the file's name


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
        source, key = one_line(source, _SOURCE_CHARS), one_line(key, _KEY_CHARS)
        super().__init__(one_line(f"{source}: {key}: {message}" if key else f"{source}: {message}", _LINE_CHARS),
                         hint)


def one_line(text: str, limit: int) -> str:
    """`text` with control characters escaped (a newline becomes `\\n`), cut to `limit` characters."""
    text = text[:limit + 1]  # escaping only ever lengthens: no need to look further
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


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
