"""Retries of remote requests: capped exponential backoff, cut short by a deadline or a stop."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from jobs.checkpoint.errors import ForeignRunFolder, describe, log
from jobs.schema.secrets import redact_text

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 4.0


class Backoff:
    """Runs an action up to `attempts` times against the store at `uri` (named, redacted, in the log)."""

    def __init__(self, attempts: int, uri: str, stop: threading.Event) -> None:
        self.attempts, self.uri, self.stop = attempts, uri, stop

    def run(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> Optional[Exception]:
        """Run `action` with exponential backoff (capped, and cut short by `deadline` or the stop
        event); None once it worked, else the last error."""
        attempt = 0
        while True:
            attempt += 1
            try:
                action()
                return None
            except ForeignRunFolder:
                raise  # not a store failure: retrying does not change who owns the folder
            except Exception as err:
                delay = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_CAP_S)
                last = attempt >= self.attempts or (deadline is not None and time.monotonic() + delay > deadline)
                log.log(logging.WARNING if last else logging.INFO, "%s at %s failed (attempt %d/%d): %s",
                        what, redact_text(self.uri), attempt, self.attempts, describe(err))
                if last or self.stop.wait(delay):
                    return err

    def retry(self, what: str, action: Callable[[], Any], deadline: Optional[float]) -> bool:
        """run(), saying in the log that what failed stays pending; True once it worked."""
        if self.run(what, action, deadline) is None:
            return True
        log.warning("%s left pending: retried at the next save and by flush()", what)
        return False
