"""A Bayesian sweep's study in an object store (S3, GCS, any fsspec store that can create a file only if it is
absent): Optuna's journal, one object per entry.

    <checkpoint.uri>/sweeps/<sweep>/study/0000000000.json, 0000000001.json, ...

Used where the sweep's processes share no file system (VMs): the launcher's workers claim and tell trials, and
each trial's rank 0 reports its evaluations, from different machines. A journal file needs a lock that every
writer honours; an object store has none, but it can create an object only if the name is free (S3's
`If-None-Match: *`, GCS's `ifGenerationMatch=0`). Entry n is written by whoever creates object n first; a writer
that loses the race reads the entries it missed and tries n + 1. Every reader replays the same entries in the
same order, which is all Optuna's JournalStorage asks of a backend. Nothing here depends on a machine
staying up: the study survives the loss of any VM and of the machine that started the sweep.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from optuna.storages.journal import BaseJournalBackend

from jobs.schema import StorageConfig
from jobs.storage import filesystem, fresh_listing

DIGITS = 10  # entry names sort as numbers: 10 digits is 10^10 entries


class ObjectJournal(BaseJournalBackend):
    """Optuna's journal as one object per entry under `uri` (a folder in an object store)."""

    def __init__(self, uri: str, storage: Optional[StorageConfig] = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri, storage or StorageConfig())
        self._next = 0  # the lowest entry number this writer has not seen taken

    def _name(self, number: int) -> str:
        return f"{self.path}/{number:0{DIGITS}d}.json"

    def _numbers(self) -> list[int]:
        """The entries in the store now, in order, up to the first gap (an entry is created whole, so a gap is
        one being written, never one lost)."""
        found = sorted(int(n) for n in (e["name"].rsplit("/", 1)[-1].removesuffix(".json")
                                         for e in fresh_listing(self.fs, self.path)) if n.isdigit())
        dense = []
        for expected, number in enumerate(found):
            if number != expected:
                break
            dense.append(number)
        return dense

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        numbers = [n for n in self._numbers() if n >= log_number_from]
        for number in numbers:
            yield json.loads(self.fs.cat_file(self._name(number)))
        if numbers:
            self._next = max(self._next, numbers[-1] + 1)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        for entry in logs:
            data = json.dumps(entry, separators=(",", ":")).encode()
            while True:
                try:
                    self.fs.pipe_file(self._name(self._next), data, mode="create")
                except FileExistsError:  # another writer took this number: the next free one
                    numbers = self._numbers()
                    self._next = max(self._next + 1, numbers[-1] + 1 if numbers else 0)
                    continue
                self._next += 1
                break


def object_storage(uri: str, storage: Optional[StorageConfig] = None) -> Any:
    """The study store at `uri` (an optuna.storages.JournalStorage)."""
    import optuna

    return optuna.storages.JournalStorage(ObjectJournal(uri, storage))
