"""Metrics sinks on rank 0: JSON lines in the run directory always, plus wandb or TensorBoard."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from jobs.schema import LoggingConfig

log = logging.getLogger("jobs.tracking")


class MetricsLogger:
    """Write-only on rank 0; a no-op elsewhere so callers need no rank checks."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, run_id: str,
                 config: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self._wandb: Any = None
        self._tb: Any = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tracker == "wandb":
            self._wandb = _start_wandb(cfg, run_dir, run_name, run_id, config)
        elif cfg.tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            log.info("tensorboard: %s", run_dir / "tensorboard")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self._wandb is not None:
            self._to_wandb(lambda: self._wandb.log(metrics, step=step))
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._wandb is not None:
            self._to_wandb(self._wandb.finish)
        if self._tb is not None:
            self._tb.close()

    def _to_wandb(self, call: Callable[[], Any]) -> None:
        """wandb talks to its service process (wandb-core 0.31). A TERM or INT to the whole job
        (scancel, `scontrol requeue`, the time limit, Ctrl-C) also reaches that process, which exits
        on them whatever it inherits (it catches both itself; USR1/USR2 it ignores), so the connection
        can be gone while the ranks are still saving. A lost tracker must not turn a clean stop into
        a failed run: metrics.jsonl keeps every value."""
        try:
            call()
        except OSError as err:  # ConnectionResetError, BrokenPipeError: the service is gone
            log.warning("wandb's service process is gone (%s: %s); metrics continue in metrics.jsonl only",
                        type(err).__name__, err)
            self._wandb = None


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_name: str, run_id: str, config: dict[str, Any]) -> Any:
    import wandb

    # Offline unless the user has a key or chose a mode: a missing login must not kill a queued job.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=cfg.project, name=run_name, id=run_id, resume="allow", config=config,
                     dir=str(run_dir), mode=mode)
    log.info("wandb run %s (mode %s): same id on resume, so the metrics continue the same run", run_id, mode)
    return run
