"""A Bayesian sweep's study, shared by both planes: its journal, how it is opened, and `trial.json`.

    <runs_dir>/sweeps/<sweep>/study.journal   the Optuna study: an append-only file, no database server
    <runs_dir>/<sweep>-tNN/trial.json          TrialTicket: which study and trial this run reports to

The launcher asks the study for trials and tells it their outcome; inside a trial, rank 0 reads
trial.json and reports each evaluation (`jobs.training.pruning`). Both open the study here. optuna is
imported inside the functions: every other command and rank pays nothing for it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from jobs.schema.errors import UsageError
from jobs.schema.run_files import replace_text

if TYPE_CHECKING:
    import optuna

    from jobs.schema.cluster import StorageConfig

STUDY_JOURNAL, TRIAL_JSON = "study.journal", "trial.json"
# Pruning is asynchronous successive halving (ASHA: Li et al., MLSys 2020; Optuna's SuccessiveHalvingPruner),
# the early-stopping half of BOHB. A trial's first rung is the step of its 3rd evaluation (the first ones fall
# in the LR warm-up and say little); rung k is at REDUCTION_FACTOR**k times that step. At each rung a trial
# goes on only while its metric is in the top third of the trials that reached the rung (while fewer than 3
# have: only while it is the best of them). Bad trials then cost one rung, and the completed trials, the
# ones that can reach a new best, are the promising third of the third.
# Not Hyperband: Optuna's TPE, under a HyperbandPruner, models each bracket's trials alone (it filters the
# study by bracket), so a sweep of tens of trials leaves every bracket in TPE's random start-up phase.
# Measured (bench.bayes_sweep, seeds 0-5: the compute to reach a 27-point grid's best val/acc, as a fraction
# of the grid's): ASHA 0.26/0.36/0.29/0.32/never/0.32, median 0.32; the median rule it replaced (stop a trial
# worse than the median of the earlier trials at the same step, from its 3rd evaluation) 0.30/0.53/0.43/
# never/0.42/0.36, median 0.42. Also measured, worse: the median rule judged from the 1st evaluation
# 0.24/never/never/0.30 (inside the warm-up the fast-rising, later diverging learning rates look best); ASHA
# with its first rung at the 1st evaluation's step, so two rungs judged at once at the 3rd,
# 0.39/0.33/never/0.28/never/never (too few trials completed to hit the noisy best).
REDUCTION_FACTOR, JUDGED_FROM_REPORT = 3, 3


@dataclass(frozen=True)
class TrialTicket:
    """trial.json, written by the launcher into a Bayesian trial's run directory before it starts."""

    journal: str  # the study's journal file (absolute path, on the file system every node shares), or its URI
    study: str  # study name: the sweep's name
    number: int  # Optuna's trial number: a resumed run reports to the same trial
    metric: str  # what rank 0 reports after each evaluation, e.g. val/acc
    prune: bool  # whether the pruner may end the run early (outcome "pruned")

    def write(self, run_dir: Path) -> None:
        replace_text(run_dir / TRIAL_JSON, json.dumps(asdict(self), indent=2) + "\n")  # a rank never reads half

    @classmethod
    def read(cls, run_dir: Path) -> Optional["TrialTicket"]:
        """The run's ticket, or None for a run that is no Bayesian trial."""
        path = run_dir / TRIAL_JSON
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(journal=str(data["journal"]), study=str(data["study"]), number=int(data["number"]),
                   metric=str(data["metric"]), prune=bool(data["prune"]))


def journal_storage(journal: Path | str, storage: Optional["StorageConfig"] = None) -> "optuna.storages.JournalStorage":
    """The study store: one append-only file, safe for several processes and nodes on a shared file
    system (Optuna's open-with-O_EXCL lock, which NFSv3 and later honour); or, for a URI (`s3://...`), one
    object per entry in that store, reached with `storage` (`jobs.study_store`: nodes that share no file system)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    quiet()
    if is_uri(str(journal)):
        from jobs.study_store import object_storage

        return object_storage(str(journal), storage)
    keep_private(Path(journal))
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))


def study_uri(checkpoint_uri: str, sweep: str) -> str:
    """Where a sweep's study lives in an object store: beside its trials' checkpoints (`jobs.study_store`)."""
    return f"{checkpoint_uri.rstrip('/')}/sweeps/{sweep}/study"


def is_uri(journal: str) -> bool:
    """A study in an object store (`s3://bucket/...`), not a journal file."""
    return "://" in journal


def keep_private(journal: Path) -> None:
    """The journal holds every trial's parameters and overrides unmasked (a choice may be a credential):
    0600 whatever existed before. Optuna appends to it, so it is made private in place, not replaced;
    a symlink there is refused rather than followed."""
    if journal.is_symlink():
        raise UsageError(f"{journal} is a symbolic link; a sweep's study journal must be a file of its own",
                         hint="remove the link, or give the sweep another --name")
    fd = os.open(journal, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def make_pruner(first_rung: int) -> "optuna.pruners.BasePruner":
    """ASHA with its first rung at step `first_rung` (the step of the trial's JUDGED_FROM_REPORT-th evaluation)."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=REDUCTION_FACTOR)


def load_study(storage: "optuna.storages.BaseStorage", name: str,
               sampler: Optional["optuna.samplers.BaseSampler"] = None) -> "optuna.Study":
    """The study, without a pruner: only a trial's rank 0 prunes (`jobs.training.pruning`), with its own."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner(), sampler=sampler)


def quiet() -> None:
    """Optuna logs every trial at INFO; the launcher prints its own lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_id(storage: "optuna.storages.BaseStorage", name: str, number: int) -> int:
    """The storage's id of trial `number` of study `name`."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(name), number)
