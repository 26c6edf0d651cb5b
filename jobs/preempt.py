"""Stop requests from signals. A handler only sets a flag; the trainer acts on it at a step
boundary (a second Ctrl-C stops at once), after all ranks have agreed (see
`jobs.training.agreement.StopAgreement`), so every rank saves the same step together. SIGTERM
(torchrun forwards it to every worker, Slurm sends it at cancellation and preemption), SIGUSR1 and
SIGUSR2 (Slurm's `--signal`) are all stop requests."""
from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None  # the latest stop signal (what the trainer reports)
        self.first_signal: str | None = None  # the one that asked first (the runtime API's stop_signal())

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal_name = signal.Signals(signum).name
        self.first_signal = self.first_signal or self.signal_name
        self._event.set()

    def request(self, reason: str) -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
