"""Async saves: the state is copied into reusable host buffers (the only time training waits), then
a writer thread commits the copy (`commit`, given by the Checkpointer) while training goes on."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from jobs.checkpoint.errors import FILE_ONLY, CheckpointError, log
from jobs.checkpoint.staging import HostBuffers


@dataclass
class SaveJob:
    step: int
    state: dict[str, Any]
    metrics: dict[str, float]
    started: float  # perf_counter at save() entry
    blocked_s: float = 0.0  # how long training waited for this save


class BackgroundSaver:
    """At most `queue_size` saves wait while one is written; a save() beyond that blocks until a
    set of host buffers is free, which bounds host memory."""

    def __init__(self, queue_size: int, commit: Callable[[SaveJob], None], where: str) -> None:
        self.commit, self.where = commit, where
        # LIFO: the set released last is taken first, so a lone save always reuses warm buffers.
        self._free: queue.LifoQueue[HostBuffers] = queue.LifoQueue()
        for _ in range(queue_size + 1):  # queue_size waiting + the one being written
            self._free.put(HostBuffers())
        self._jobs: queue.Queue[Optional[tuple[SaveJob, HostBuffers]]] = queue.Queue()
        self._lock = threading.Condition()
        self._in_flight = 0  # saves accepted but not yet committed
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="ckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        """Copy `job.state` to host buffers and queue it; returns once the copy is done."""
        buffers = self._free.get()  # blocks while queue_size saves are waiting
        try:
            job.state = buffers.snapshot(job.state)
        except BaseException:
            self._free.put(buffers)
            raise
        with self._lock:
            self._in_flight += 1
        job.blocked_s = time.perf_counter() - job.started
        self._jobs.put((job, buffers))
        log.info("checkpoint step %d: training blocked %.3f s for the host copy", job.step, job.blocked_s,
                 extra=FILE_ONLY)

    def wait_idle(self, deadline: float) -> bool:
        """Wait until every queued save is committed (or failed), up to `deadline` (time.monotonic())."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, deadline - time.monotonic()))

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._in_flight == 0

    def take_error(self) -> Optional[BaseException]:
        error, self._error = self._error, None
        return error

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, buffers = item
            try:
                self.commit(job)
            except BaseException as err:
                log.exception("background checkpoint save of step %d failed", job.step)
                self._error = self._error or CheckpointError(f"background save of step {job.step} to "
                                                             f"{self.where} failed: {err}")
            finally:
                job.state = {}  # the snapshot lives in the buffers: let the next save() reuse them
                self._free.put(buffers)
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()
