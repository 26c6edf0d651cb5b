"""The owner claim: a remote checkpoint folder belongs to one run, named by its owner record
(jobs.checkpoint.layout.OWNER_FILE), written before the first upload and checked before every
round; a folder of another run is neither read, written nor pruned."""
from __future__ import annotations

import time
from typing import Optional

from jobs.checkpoint.errors import FILE_ONLY, ForeignRunFolder, describe, log
from jobs.checkpoint.layout import OWNER_FILE, owner_record
from jobs.checkpoint.remote_files import RemoteFiles
from jobs.schema.secrets import redact_text
from jobs.storage import folder_owner, foreign_folder_message


class FolderOwner:
    """Checks and claims the remote folder for `run_id` (None: a run without an id checks nothing)."""

    def __init__(self, files: RemoteFiles, run_id: Optional[str]) -> None:
        self.files, self.run_id = files, run_id

    def claim_at_start(self) -> None:
        """Refuse a folder owned by another run before anything is read or written. A store that
        cannot be reached now is checked again before the first upload."""
        try:
            self.check(claim=True)
        except ForeignRunFolder:
            raise
        except Exception as err:
            log.warning("cannot check which run owns %s now (%s); checked again before the first upload",
                        redact_text(self.files.remote.uri), describe(err))

    def check(self, claim: bool) -> None:
        """Raise ForeignRunFolder if the remote folder belongs to another run. With `claim`, a
        folder no run owns yet gets this run's owner record."""
        if self.run_id is None:
            return
        remote = self.files.remote
        try:
            owner = folder_owner(remote.fs, remote.root)
        except ValueError as err:
            raise ForeignRunFolder(f"cannot tell which run owns {redact_text(remote.uri)}: {err}. If the folder "
                                   f"is this run's (id {self.run_id}), delete {OWNER_FILE} there") from None
        if owner is None and claim:
            self.files.put_text("", OWNER_FILE, owner_record(self.run_id, time.time()))
            log.info("%s now belongs to run %s (%s)", redact_text(remote.uri), self.run_id, OWNER_FILE,
                     extra=FILE_ONLY)
        elif owner is not None and owner != self.run_id:
            message, hint = foreign_folder_message(remote.uri, owner, f"this run (id {self.run_id})")
            raise ForeignRunFolder(f"{message}\n  HINT: {hint}")
