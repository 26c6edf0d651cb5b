"""Range checks shared by the config sections: each raises a ConfigError naming the file, key and value."""
from __future__ import annotations

from typing import Optional

from jobs.schema.errors import ConfigError, short

MAX_TIME_MIN = 365 * 24 * 60  # a year: anything longer is a typo (or seconds given as minutes)
MAX_SEED = 2**31 - 1  # numpy seeds with seed + rank and refuses values of 2**32 and above


def positive(src: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(src, key, f"{short(value)} must be > 0")


def non_negative(src: str, key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(src, key, f"{short(value)} must be >= 0")


def fraction(src: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(src, key, f"{short(value)} must be between 0 and 1")


def seed(src: str, key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(src, key, f"{short(value)} must be between 0 and {MAX_SEED}")


def non_empty(src: str, key: str, value: Optional[str]) -> None:
    """Optional strings are unset (null) or say something: an empty partition or URI is a mistake."""
    if value is not None and not value.strip():
        raise ConfigError(src, key, f"{short(value)} is empty", f"set a value, or leave {key} out (null)")
