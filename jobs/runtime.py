"""The runtime API: what a script started by `launcher run` may use from inside its ranks.

    from jobs import runtime

    env = runtime.rank_env()                  # rank, local_rank, world_size, ... (torchrun's variables)
    ckpt = runtime.checkpointer()             # bound to the run: its checkpoint.uri, keep_last, ...
    start, state = 0, None
    if (found := ckpt.load_latest(map_location="cpu")) is not None:
        start, state = found                  # the step it was saved at, and name -> object
    for step in range(start, steps):
        ...                                   # one training step
        if runtime.should_stop():             # the same answer on every rank, at the same step
            ckpt.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict()})
            break
    ckpt.close()                              # waits for the save to be committed (and uploaded)

The contract, kept stable:
- `should_stop()` is a collective: every rank calls it once per step, in the same order as its
  other collectives. It turns true on every rank at the same call after a stop signal reached any
  rank (a Slurm preemption notice or time-limit warning, `launcher cancel`, Ctrl-C), one call after
  the signal (the ranks' flags are combined by an asynchronous all-reduce, as the trainer does).
- `checkpointer().save(step, state)` commits `state` (name -> state dict, tensor or plain value)
  atomically under `step-<step>` with the manifest protocol: written in the background after a
  host copy, uploaded to the run's checkpoint.uri, pruned to checkpoint.keep_last. Rank 0 writes;
  on other ranks it does nothing, so every rank may call it. `load_latest()` returns the newest
  intact checkpoint (step, state) or None, on every rank.
- On Slurm, a run stopped by a preemption notice is requeued and the script starts again on every
  rank: `load_latest()` then continues it. Relaunching a stopped run (`launcher run` with the same
  --run-name) continues it the same way.
- `run_id()` is the run's id, kept across requeues and relaunches: give it to a tracker
  (`wandb.init(id=runtime.run_id(), resume="allow")`) so the whole run is one tracked run.

Importing this module inside a run installs the stop handlers (SIGTERM, SIGINT, SIGUSR1, SIGUSR2)
that `should_stop()` reads; a script that does not import it keeps Python's defaults, or its own.
Outside a run (`python train.py`), `rank_env()` and `should_stop()` work (one process, or torchrun's
variables) and `checkpointer()` raises RuntimeError: there is no run to bind it to.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

from jobs.env import RankEnv
from jobs.preempt import StopFlag
from jobs.script_start import RUN_DIR_VAR
from jobs.schema.run_dir import STEP_DIR, Run

__all__ = ["RunCheckpointer", "checkpointer", "rank_env", "run_dir", "run_id", "run_name", "should_stop",
           "stop_signal"]

_flag = StopFlag()
_agreement: Any = None  # jobs.training.agreement.StopAgreement, made on the first should_stop() (torch)
_progress: Any = None  # jobs.progress.ProgressWriter: should_stop() is the script's step, reported to the watchdog


def _install_handlers() -> None:
    if threading.current_thread() is threading.main_thread():  # Python only allows it there
        _flag.install()


def _note_use() -> None:
    """run.json says the script uses the runtime API (rank 0, once): `launcher cancel` then promises a
    checkpoint, which it cannot for a script that never imported this module."""
    if os.environ.get("RANK", "0") != "0":
        return
    run = Run.at(os.environ[RUN_DIR_VAR])
    try:
        if not run.info().runtime_api:
            run.update(runtime_api=True)
    except Exception:  # noqa: BLE001 - a record that cannot be written must not stop the script
        pass


if os.environ.get(RUN_DIR_VAR):
    _install_handlers()
    _note_use()


def rank_env() -> RankEnv:
    """Who this rank is (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    return RankEnv.from_environ()


def run_dir() -> Optional[Path]:
    """The run's directory, or None outside a run started by the launcher."""
    value = os.environ.get(RUN_DIR_VAR)
    return Path(value) if value else None


def _run() -> Run:
    folder = run_dir()
    if folder is None:
        raise RuntimeError(f"not inside a launcher run ({RUN_DIR_VAR} is not set): start the script with "
                           "`launcher run SCRIPT`")
    return Run.at(folder)


def run_id() -> str:
    """The run's id: the same across requeues and relaunches (a tracker's run id)."""
    return _run().readable_info().run_id


def run_name() -> str:
    return _run().name


def stop_signal() -> Optional[str]:
    """The first signal that asked this rank to stop, or None: SIGUSR1/SIGUSR2 for a Slurm preemption
    notice or time-limit warning (the rank forwards it as it is to a script that imports this module),
    SIGTERM for a cancel, SIGINT for Ctrl-C."""
    return _flag.first_signal


def should_stop() -> bool:
    """True on every rank at the same call once any rank was asked to stop. A collective where a
    process group is initialised: call it on every rank, once per step."""
    global _agreement
    import torch.distributed as dist

    _beat()

    if not dist.is_initialized():
        return _flag.requested
    if _agreement is None:
        from jobs.training.agreement import StopAgreement

        _agreement = StopAgreement()
    return _agreement.exchange(_flag.requested, False)[0]


def _beat() -> None:
    """One step of the script, for the watchdog of the run's supervisor (inside a run only)."""
    global _progress
    if _progress is None:
        if not os.environ.get(RUN_DIR_VAR):
            return
        from jobs.progress import ProgressWriter

        _progress = ProgressWriter(_run().progress_file(int(os.environ.get("RANK", "0"))))
    _progress.beat()


class RunCheckpointer:
    """The run's checkpointer (`jobs.checkpoint.Checkpointer`) with step numbers on load."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def save(self, step: int, state: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> None:
        """Commit `state` as the checkpoint of `step`, in the background (rank 0 writes; others: no-op)."""
        self._inner.save(step, state, metrics or {})

    def load_latest(self, map_location: Any = "cpu") -> Optional[tuple[int, dict[str, Any]]]:
        """(step, name -> object) of the newest intact checkpoint of this run, or None."""
        found = self._inner.load_latest(map_location)
        if found is None:
            return None
        location, state = found
        match = STEP_DIR.match(location.rstrip("/").rsplit("/", 1)[-1])
        assert match, f"checkpoint folder {location} is not step-<N>"
        return int(match.group(1)), state

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for queued saves and uploads; True when all are committed."""
        return self._inner.flush(timeout)

    def close(self) -> bool:
        """Flush (checkpoint.flush_timeout_s at most), then stop the background threads."""
        done = self.flush()
        self._inner.close()
        return done

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpointer() -> RunCheckpointer:
    """A checkpointer bound to this run: checkpoint.* of its recipe, its storage credentials, its
    run id as the owner of the remote folder. Call it once (it starts background threads)."""
    from jobs.run_checkpointer import checkpointer_for  # torch: only when a script asks for checkpoints
    from jobs.training.context import RunContext

    run = _run()
    return RunCheckpointer(checkpointer_for(RunContext.of(run), run.recipe(), run.cluster().storage,
                                            is_writer=rank_env().is_main))
