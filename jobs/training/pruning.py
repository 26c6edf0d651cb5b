"""A Bayesian sweep's trial, seen from rank 0: report each evaluation to the study, ask its pruner.

Registered by `jobs.train` on rank 0 when the run directory holds a trial.json (`jobs.schema.study.TrialTicket`,
written by the launcher). Only rank 0 touches the journal: the trainer hands rank 0's answer to every
rank, which then all stop after the same evaluation (outcome "pruned"). The launcher, not the rank,
tells the study how the trial ended: it also sees runs that crashed before they could say anything.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from jobs.schema import StorageConfig

from jobs.training.state import TrainState
from jobs.schema.study import JUDGED_FROM_REPORT, TrialTicket, journal_storage, load_study, make_pruner, trial_id

log = logging.getLogger("jobs.pruning")


class TrialReporter:
    """`on_evaluate`: report the ticket's metric at this step; True when the pruner says stop."""

    def __init__(self, ticket: TrialTicket, storage: Optional[StorageConfig] = None) -> None:
        self.ticket = ticket
        self.storage = storage  # how to reach a study kept in an object store (the run's cluster config)
        self._storage: Any = None  # the journal, opened at the first evaluation
        self._study: Any = None  # optuna.Study
        self._trial: Any = None  # optuna.trial.Trial
        self._id = -1  # its id in the storage

    def _open(self) -> None:
        import optuna

        self._storage = journal_storage(self.ticket.journal, self.storage)
        self._study = load_study(self._storage, self.ticket.study)
        self._id = trial_id(self._storage, self.ticket.study, self.ticket.number)
        self._trial = optuna.trial.Trial(self._study, self._id)

    def on_evaluate(self, progress: TrainState, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.ticket.metric)
        if value is None:
            return False
        if self._trial is None:
            self._open()
        # A resumed run evaluates again the steps after its checkpoint: the first report of a step stays
        reported = self._storage.get_trial(self._id).intermediate_values
        if progress.step not in reported:
            self._trial.report(value, progress.step)
        steps = sorted(reported.keys() | {progress.step})
        if not self.ticket.prune or len(steps) < JUDGED_FROM_REPORT:
            return False
        # the first rung is this run's 3rd evaluation, whatever its eval_every (a resumed run finds the same)
        self._study.pruner = make_pruner(first_rung=steps[JUDGED_FROM_REPORT - 1])
        if self._trial.should_prune():
            log.info("trial %d of study %s pruned at step %d (%s %.4f)", self.ticket.number, self.ticket.study,
                     progress.step, self.ticket.metric, value)
            return True
        return False
