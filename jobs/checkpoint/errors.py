"""What the checkpoint package raises, and how it reports: one logger for all of its modules and
error text safe for logs."""
from __future__ import annotations

import logging

from jobs.schema.secrets import redact_text

# One logger for the whole package ("jobs.checkpoint"): rank logs show it and tests filter on it.
log = logging.getLogger("jobs.checkpoint")
# `extra=` of per-save detail (saved, uploaded, pruned): the rank's log file keeps it, the console
# shows only what a person watching needs (see jobs.train.setup_logging).
FILE_ONLY = {"console": False}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names it and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A file of a committed checkpoint does not match its manifest's size or SHA-256."""


class ForeignRunFolder(CheckpointError):
    """The remote checkpoint folder belongs to another run: nothing is written or deleted there."""


class InvalidCheckpoint(Exception):
    """A step folder that is not a committed checkpoint; the message says why."""


def describe(err: BaseException) -> str:
    """An error for the log, with any user:password@ in URLs masked."""
    return redact_text(f"{type(err).__name__}: {err}")
