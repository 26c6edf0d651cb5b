"""What every backend offers: the `Backend` protocol, and the small types its methods exchange.

A backend is a module whose functions match `Backend` (modules satisfy a Protocol like objects do);
`launcher.backends.get(name)` returns it. Commands and sweeps use these methods only, so nothing
outside `launcher/backends/` knows which scheduler runs a job.
"""
from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, cast

from jobs.schema.run_dir import Run
from jobs.schema.run_files import open_regular
from jobs.schema import ClusterConfig, RecipeConfig
from jobs.schema.errors import UsageError
from launcher.checks import Check

# States (as `status` reports them) of a run that still runs or will run again, whatever its backend:
# a second launch must not rewrite its directory, a sweep must not start it again.
LIVE_STATES = frozenset({"running", "pending", "requeued", "submitted", "configuring", "completing", "suspended",
                         "requeue_hold", "requeue_fed", "resizing", "signaling", "stage_out",
                         "waiting_for_hosts", "restarting"})  # restarting: in place, after a hang or a crash


@dataclass(frozen=True)
class Batch:
    """Several runs launched as one unit (a sweep's trials)."""

    name: str  # the unit's name on a scheduler (the sweep's name)
    folder: Path  # the unit's own folder: a backend may keep its files there, one subfolder per launch
    launch: int  # 1 for the first launch of the unit, 2 when the same sweep runs again, ...
    max_parallel: Optional[int] = None  # at most this many runs at once (None: no limit)


@dataclass(frozen=True)
class Planned:
    """A run of a batch before its directory is prepared: a backend calls `prepare` right before it
    starts (or submits) the run, so a run that never starts keeps its directory as it was."""

    recipe: RecipeConfig
    prepare: Callable[[], Run]


@dataclass(frozen=True)
class Launched:
    """What `launch_many` did."""

    code: int  # exit code: 0, or 1 once a run has failed or was stopped (known only where `ended`)
    ended: bool  # True: the runs have ended (local); False: they were queued (`wait` follows them)
    batch_id: Optional[str] = None  # the scheduler's id of the whole unit (a Slurm job array), if any


class Backend(Protocol):
    """Starts, follows and stops runs, each in its run directory (`launcher.runs`)."""

    # Whether the backend starts a run's ranks again by itself (a Slurm requeue, a VM relaunch): a script
    # that does not know how to continue is then told so before it starts (launcher.scripts.restart_hint).
    RESTARTS_RUNS: bool

    def check(self, recipe: RecipeConfig, cluster: ClusterConfig) -> None:
        """Raise UsageError if this run cannot be launched here; called before anything exists."""

    def check_many(self, named: Sequence[tuple[str, RecipeConfig]], cluster: ClusterConfig) -> None:
        """Raise UsageError if these runs (each already `check`ed) cannot be launched as one `Batch`."""

    def launch(self, recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
        """Start the run; an exit code. Local: returns when the ranks have ended; Slurm: once queued."""

    def launch_many(self, planned: Sequence[Planned], cluster: ClusterConfig, batch: Batch) -> Launched:
        """Start several runs as one unit (all `check`ed and `check_many`ed)."""

    def status(self, run: Run) -> dict[str, Any]:
        """What `launcher status` prints: at least `run`, `state` and `backend`."""

    def live(self, run: Run) -> Optional[str]:
        """How the run still runs or will run again, for an error message ("running (pid 7, DIR)"),
        or None if it does neither."""

    def cancel(self, run: Run) -> str:
        """Stop the run, marked `cancelled` first (a trainer's ranks save a checkpoint; a script is told to
        stop); a line saying what was done and what the run does with it (`what_a_stop_does`)."""

    def wait(self, runs: Sequence[Run]) -> dict[str, str]:
        """Block until every run has stopped for good (requeues included): run name -> final state."""

    def logs(self, run: Run, rank: int, follow: bool) -> int:
        """Print rank `rank`'s log (and what it adds while the run lives, with `follow`); an exit code."""

    def stacks(self, run: Run, dest: Path) -> dict[int, str]:
        """Every rank's Python stack now (a live run): rank -> the dump's text (`jobs.stacks.dump`, run where the
        ranks are), each also written to `dest/rank<N>.txt` on the ranks' host."""

    def environment_checks(self, cluster: ClusterConfig) -> list[Check]:
        """What `launcher doctor` checks from here besides what every backend needs (torch, runs_dir, the
        store: launcher.doctor.environment): Slurm's commands and controller, each VM over SSH, ..."""


class SweepWorkers(Protocol):
    """What a backend that runs Bayesian sweeps offers besides `Backend` (local, Slurm and VMs do; `workers()`
    says whether one does): workers that draw trials from the study, and a trial run from inside one."""

    def check_workers(self, recipe: RecipeConfig, cluster: ClusterConfig, workers: int) -> None:
        """Raise UsageError if `workers` workers of trials like `recipe` cannot run here; before anything exists."""

    def study_uri(self, recipe: RecipeConfig, cluster: ClusterConfig, name: str) -> Optional[str]:
        """Where sweep `name`'s study lives when its workers share no file system (an object store URI); None:
        the journal file in the sweep's folder."""

    def launch_workers(self, recipe: RecipeConfig, cluster: ClusterConfig, folder: Path, name: str, attempt: int,
                       workers: int, work_here: Callable[[int], int]) -> Launched:
        """Start `workers` workers of the sweep whose study is in `folder` (locally, worker 0 may be
        `work_here` in this process)."""

    def run_trial_here(self, recipe: RecipeConfig, cluster: ClusterConfig, run: Run) -> int:
        """Run one trial to its end from inside a worker; its exit code."""

    def workers_live(self, batch_id: str) -> bool:
        """Whether the workers launched as `batch_id` (a Launched.batch_id) are still queued or running."""

    def wait_workers(self, batch_id: str) -> int:
        """Block until the workers launched as `batch_id` have ended; an exit code."""


def workers(backend: Backend) -> Optional[SweepWorkers]:
    """`backend` as a SweepWorkers, or None where it runs no Bayesian sweep."""
    return cast(SweepWorkers, backend) if hasattr(backend, "launch_workers") else None


def what_a_stop_does(run: Run) -> str:
    """What a run does when it is told to stop, as far as the launcher knows: a recipe's trainer and a
    script that uses the runtime API (run.json says so once it imported `jobs.runtime`) save a
    checkpoint; any other script gets SIGTERM and nothing is promised."""
    try:
        script = run.recipe().script
    except Exception:  # noqa: BLE001 - an unreadable config.yaml: say only what is certain
        return "its ranks get SIGTERM"
    if script is None:
        return "it saves a checkpoint and stops"
    if run.info().runtime_api:
        return "the script (runtime API) saves a checkpoint and stops"
    return ("the script is told to stop (SIGTERM); it does not use the runtime API, so whether it saves "
            "anything is up to the script")


def print_log(run: Run, rank: int, follow: bool, live: Callable[[], bool]) -> int:
    """`logs` where the log is a file in the run directory (every node writes there: this machine, Slurm)."""
    path = run.dir / "logs" / f"rank{rank}.log"
    if not path.exists():
        raise UsageError(f"{path}: no log for rank {rank} (yet)")
    try:
        raw = open_regular(path)  # a FIFO would block for ever, a link to /dev/zero never end
    except OSError as err:
        raise UsageError(f"{path}: cannot be read: {err.strerror or err}",
                         hint="a rank's log is a plain file the launcher writes: move this one aside") from None
    # a log is what a process wrote, not necessarily UTF-8: show undecodable bytes as U+FFFD, never fail
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        _copy(f)
        while follow and live():
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)
        _copy(f)
    return 0


def _copy(f: io.TextIOWrapper) -> None:
    """The rest of `f` to stdout, a chunk at a time: a log of many GiB is never held whole."""
    while chunk := f.read(1 << 20):
        sys.stdout.write(chunk)
