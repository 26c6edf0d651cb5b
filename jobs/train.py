"""Rank entry point: `python -m jobs.train --run-dir RUN_DIR` (started by torchrun, srun or submitit).

It reads the resolved config that the launcher wrote into the run directory and the rank
environment (torchrun's variables), and knows nothing about which backend started it."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from types import TracebackType


from tqdm import tqdm

from jobs import parallel
from jobs import stacks
from jobs.env import RankEnv
from jobs.preempt import StopFlag
from jobs.progress import StepReporter
from jobs.training.callbacks import Callback, FirstStepMarker
from jobs.training.context import RunContext
from jobs.training.run import train
from jobs.schema import RecipeConfig, UsageError, to_dict
from jobs.schema.run_dir import LOGS, Run, RunResult
from jobs.schema.secrets import RedactFilter, secret_values
from jobs.schema.study import TrialTicket


class ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts the progress bar, prints the line and draws the bar again
    below it: a log line never lands in the middle of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def on_console(record: logging.LogRecord) -> bool:
    """Per-save detail (logged with `extra={"console": False}`) stays in the rank's log file."""
    return getattr(record, "console", True)


def setup_logging(run_dir: Path, env: RankEnv) -> None:
    (run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    to_file = logging.FileHandler(run_dir / LOGS / f"rank{env.rank}.log")
    to_file.setFormatter(fmt)
    to_console = ConsoleHandler(sys.stdout)
    to_console.setFormatter(fmt)
    to_console.setLevel(logging.INFO if env.is_main else logging.WARNING)  # one voice on the console
    to_console.addFilter(on_console)
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_console]
    root.setLevel(logging.INFO)


def redact_logs(values: set[str]) -> None:
    """Every handler masks the run's secrets, and so does the hook that prints an uncaught exception
    (it writes to stderr directly, past the handlers)."""
    mask = RedactFilter(values)
    for handler in logging.getLogger().handlers:
        handler.addFilter(mask)

    def masked_hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        sys.stderr.write(mask.mask("".join(traceback.format_exception(kind, err, tb))))

    sys.excepthook = masked_hook


def run_training(run: Run | Path, env: RankEnv | None = None, stop: StopFlag | None = None,
                 force_resume: bool = False) -> RunResult:
    """Train this rank of `run` (a Run another entry point has opened and maybe read already: each
    config file is parsed once per rank, or a run directory)."""
    run = run if isinstance(run, Run) else Run.at(run)
    env = env or RankEnv.from_environ()
    env.check()
    stop = stop or StopFlag().install()
    setup_logging(run.dir, env)
    stacks.install(run.dir, env.rank)  # `launcher stacks` and the hang watchdog find and read this process
    logging.getLogger("jobs.train").info("rank %d of %d on %s (local rank %d), run %s", env.rank, env.world_size,
                                         socket.gethostname(), env.local_rank, run.dir)
    recipe, cluster = run.recipe(), run.cluster()
    recipe = _on_the_nodes_there_are(recipe, env)
    redact_logs(secret_values([to_dict(recipe), to_dict(cluster)]))
    info = run.readable_info()
    if info.code_dir:  # the user's package next to the recipe: importable as in the launcher's check
        sys.path.insert(0, info.code_dir)
    context = RunContext.of(run, info, force_resume)
    try:
        result = train(recipe, context, cluster.storage, env, stop, _callbacks(run, env))
    except UsageError as err:  # e.g. a factory in the recipe returned the wrong type: one line, no traceback
        logging.getLogger("jobs.train").error("%s", err)
        parallel.shutdown(clean=False)
        raise
    except BaseException as err:
        _log_failure(err)
        parallel.shutdown(clean=False)
        raise
    parallel.shutdown()
    return result


def _on_the_nodes_there_are(recipe: RecipeConfig, env: RankEnv) -> RecipeConfig:
    """A run relaunched on fewer nodes than its recipe names (the VMs that came back, vms.min_nodes; checked
    at launch for every size allowed): the same global batch over fewer replicas, each accumulating more."""
    p = recipe.parallel
    nodes = env.world_size // p.procs_per_node
    if env.world_size == p.world_size or nodes * p.procs_per_node != env.world_size or nodes > p.nodes:
        return recipe
    resized = recipe.on_nodes(nodes)
    if env.is_main:
        logging.getLogger("jobs.train").info(
            "running on %d of the recipe's %d nodes: %s micro-batches per replica and step instead of %s; the "
            "global batch stays %d", nodes, p.nodes, resized.grad_accum or "auto", recipe.grad_accum or "auto",
            recipe.trainer.global_batch)
    return resized


def _log_failure(err: BaseException) -> None:
    """The traceback into this rank's log file too: the console (torchrun's, a Slurm job's output) is
    gone after the run, and `launcher doctor` reads the run directory. Not to the console: the
    exception hook prints it there once already."""
    if not isinstance(err, (KeyboardInterrupt, SystemExit)):
        logging.getLogger("jobs.train").error("rank failed: %s: %s", type(err).__name__, err, exc_info=err,
                                              extra={"console": False})


def _callbacks(run: Run, env: RankEnv) -> list[Callback]:
    """first_step.json belongs to the run directory, whatever started the run: `make bench` times
    launch-to-first-step with it and tests wait on it before signalling a run, through `launcher
    launch`, sbatch or submitit alike. Registering it here, at the one rank entry point every
    backend goes through, keeps it out of the trainer without an opt-in variable that each backend
    would have to carry to the ranks. One writer: rank 0. The same holds for a Bayesian sweep's trial:
    the launcher's trial.json in the run directory says which study rank 0 reports to (and whether
    its pruner may stop the run); the other ranks follow rank 0's answer. Every rank reports its progress
    (jobs.progress), which the watchdog of whatever supervises it reads."""
    reporter = StepReporter(run.progress_file(env.rank))
    if not env.is_main:
        return [reporter]
    callbacks: list[Callback] = [reporter, FirstStepMarker(run.dir)]
    ticket = TrialTicket.read(run.dir)
    if ticket is not None:
        from jobs.training.pruning import TrialReporter  # optuna: only in a Bayesian sweep's trials

        callbacks.append(TrialReporter(ticket, run.cluster().storage))
    return callbacks


def stop_with_parent() -> None:
    """Linux: SIGTERM this rank when its parent (torchrun, srun) dies. torchrun starts ranks in their
    own sessions, so without this a SIGKILLed agent leaves ranks training on as orphans; with it they
    agree on a step, save and exit like any other stop."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: nothing to do


def exit_cleanly() -> None:
    """End a rank whose run finished, skipping the interpreter's teardown of C++ objects: under
    load, a gloo rank sometimes aborts there (`terminate called without an active exception`) after
    everything was saved, and Slurm then marks the finished job FAILED. Everything of ours is
    flushed and closed by now; only call this when the run succeeded."""
    if getattr(sys, "last_value", None) is not None:  # an uncaught exception is on its way out
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    stop_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        run_training(args.run_dir.resolve())
    except UsageError:
        return 2  # logged by run_training; the run fails

    exit_cleanly()
    return 0


if __name__ == "__main__":
    sys.exit(main())
