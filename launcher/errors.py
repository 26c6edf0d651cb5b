"""User-facing errors: each names where the problem is and what to do; the CLI turns them into exit code 2."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a file, a key, a value). Nothing has been started when this is raised."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override holds something invalid."""

    def __init__(self, source: str, key: str, message: str, hint: str = "") -> None:
        self.source, self.key, self.message, self.hint = source, key, message, hint
        text = f"{source}: {key}: {message}" if key else f"{source}: {message}"
        if hint:
            text += f"\n  HINT: {hint}"
        super().__init__(text)
