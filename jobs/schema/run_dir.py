"""A run directory's layout, its configs and its two records, read and written by both planes through
one typed API: `Run.at(folder)` opens a run, `recipe()`/`cluster()` parse its resolved configs once,
`info()`/`result()` read its records (the launcher's `launcher.runs.run_at` checks a name, then opens).

    <runs_dir>/<run_name>/
        run.json        RunInfo: names, tracking id, backend, job ids, pids   run.json.lock  serialises updates
        config.yaml     resolved recipe      cluster.yaml  resolved cluster config (both with secrets masked)
        secrets.yaml    the masked values, mode 0600 (only when there are any; see jobs.schema.secrets)
        logs/rankN.log  metrics.jsonl  result.json (RunResult)  model.pt  checkpoints/ (local copies)
        failures/       one file per rank that raised, read after srun to count a failure (Slurm)
        progress/rankN  each rank's progress report, read by the watchdog (jobs.progress)
        logs/stacks/hang-<attempt>/rankN.txt  every rank's stack, dumped before a hung attempt is ended
        script_checkpoints/  work/   `launcher run`: the script's own checkpoints and working directory
        ranks/rankN.json  each rank's process (pid, start time, host), for `launcher stacks` (jobs.stacks)
        logs/stacks/rankN.txt  what a rank's faulthandler wrote; logs/stacks/<time>/rankN.txt  one dump of every rank

Several processes write run.json (the launcher, rank 0, `launcher cancel`), so every update is a
read-modify-write under an exclusive lock, written to a unique temporary file and renamed over it:
a reader never sees half a file and no update is lost. Readers take no lock. A file that cannot be
read (not JSON, a field of the wrong type) reads as empty, and `problems()` says why.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import yaml

from jobs.schema import secrets
from jobs.schema.cluster import ClusterConfig
from jobs.schema.errors import UsageError
from jobs.schema.files import load_resolved, recipe_document, to_dict
from jobs.schema.recipe import RecipeConfig
from jobs.schema.run_files import MAX_RECORD, load_record, read_capped, replace_text

RUN_JSON, RESULT_JSON = "run.json", "result.json"
CONFIG_YAML, CLUSTER_YAML = "config.yaml", "cluster.yaml"
CHECKPOINTS, LOGS, FAILURES = "checkpoints", "logs", "failures"
PROGRESS = "progress"  # <run>/progress/rankN: each rank's last step report (the hang watchdog reads them)
REQUEUE_ASKED = "requeue_asked"  # a script's own `scontrol requeue`, a file per job start (environments.slurm_requeue)
# `launcher run`: the script's own checkpoint folder ({checkpoint_dir}) and working directory (script.workdir: run)
SCRIPT_CHECKPOINTS, SCRIPT_WORKDIR = "script_checkpoints", "work"
METRICS_JSONL, FINAL_MODEL = "metrics.jsonl", "model.pt"
# Each rank's process record (jobs.stacks writes it at start) and, under logs/, the folder of its stack dumps
RANKS, STACKS = "ranks", "stacks"
# A checkpoint folder (local or remote) holds step-N/ folders; one is committed once its manifest exists,
# written last (see jobs.checkpoint). The launcher needs this much of the layout too.
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
ENDED_BY_STOP = ("preempted", "cancelled")  # outcomes of a run told to stop: the same command resumes it


def checkpoint_uri(recipe: RecipeConfig, run_name: str) -> Optional[str]:
    """The run's own folder under `checkpoint.uri`, or None: local checkpoints only."""
    uri = recipe.checkpoint.uri
    return f"{uri.rstrip('/')}/{run_name}" if uri else None


def committed_steps(folder: Path) -> list[int]:
    """Steps of the committed checkpoints in a local folder, oldest first; half-written ones are not counted."""
    try:
        names = [p.name for p in folder.iterdir() if (p / MANIFEST).is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)


def rank_log(rank: int) -> str:
    """Rank `rank`'s log, relative to the run directory (on VMs, each host's copy of it)."""
    return f"{LOGS}/rank{rank}.log"


def note_line(event: str) -> str:
    """A note as `launcher logs` shows it (Run.note; the VM supervisor writes the same into another host's log)."""
    return f"launcher: {time.strftime('%Y-%m-%dT%H:%M:%S')} {event}\n"


@dataclass(frozen=True)
class RunInfo:
    """run.json. Every field is optional in the file: a run being created has none yet."""

    run_name: str = ""
    run_id: str = ""  # the tracker's run id and the checkpoint folder's owner: kept across relaunches
    recipe: str = ""
    cluster: str = ""
    backend: str = ""  # the backend that started the last launch
    resume: str = "auto"
    checkpoint_uri: Optional[str] = None  # masked, for people: ranks derive the real one from the recipe
    config_hash: str = ""
    runtime_api: Optional[bool] = None  # `launcher run`: the script imported jobs.runtime (it saves on a stop)
    code_dir: Optional[str] = None  # the launch directory: first on every rank's import path (user code)
    created: str = ""
    launches: int = 0
    state: Optional[str] = None  # submitted, running, requeued, stopped, completed, cancelled, ...
    exit_code: Optional[int] = None  # the run's, as `launcher` exits: a failed rank's own, 128 + N for signal N
    failed_rank: Optional[int] = None  # `launcher run`: the first rank whose script failed in this launch
    pid: Optional[int] = None  # local: torchrun, with its start time so a reused pid is not taken for it
    pid_start: Optional[int] = None
    launcher_pid: Optional[int] = None  # local: the `launcher launch` process that forwards signals
    launcher_start: Optional[int] = None
    job_id: Optional[str] = None  # Slurm: the current job
    job_ids: list = field(default_factory=list)  # Slurm: every job of this run, oldest first
    sbatch_script: Optional[str] = None
    submitit_folder: Optional[str] = None
    restarts: Optional[int] = None  # Slurm: SLURM_RESTART_COUNT of the running job
    # Slurm: requeues so far by kind: the launcher's own (preemptions, timeouts, failures, counted before it
    # requeues) and those it did not make (admin_requeues: `scontrol requeue`; node_failures), counted at restart
    requeues: dict = field(default_factory=dict)
    last_requeue: Optional[str] = None
    stop_reason: Optional[str] = None  # why the run stopped instead of requeueing (a budget ran out)
    # restarts inside the allocation by kind ("hangs", "crashes"), against resilience.max_*_restarts
    inplace_restarts: dict = field(default_factory=dict)
    inplace_stop: Optional[str] = None  # why the run was not restarted in place (a budget ran out)
    # `launcher run`: this start of the script (1 = the run's first) and what identifies it (the launch,
    # Slurm job and restart, torchrun's rendezvous), whether it continues earlier progress, and the line
    # saying a restart probably began from scratch
    attempt: Optional[int] = None
    attempt_key: Optional[str] = None
    resuming: Optional[bool] = None
    restart_note: Optional[str] = None
    slow_rank: Optional[str] = None  # the newest slow-rank warning of rank 0 (jobs.training.slow_ranks)
    extra: dict = field(default_factory=dict)  # keys this version does not know: kept, never dropped

    def __bool__(self) -> bool:  # false: no run.json yet, or one that cannot be read
        return self != RunInfo()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunInfo":
        return _from_flat(cls, data, "extra")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}


@dataclass(frozen=True)
class RunResult:
    """result.json: what rank 0 wrote at the end of the last launch; the metrics are flat in the file."""

    # completed, failed (any rank's non-zero exit or signal), pruned (a sweep's trial), preempted (stopped by a
    # signal: a notice, Ctrl-C; the same command resumes it) or cancelled (stopped by `launcher cancel`)
    outcome: str = ""
    step: Optional[int] = None
    epoch: Optional[int] = None
    signal: Optional[str] = None  # the signal that stopped a preempted or cancelled run
    checkpoints_committed: Optional[bool] = None  # every checkpoint reached its remote folder in time
    exit_code: Optional[int] = None  # `launcher run`: the run's exit code, as in run.json (128 + N: signal N)
    metrics: dict = field(default_factory=dict)  # last evaluation, e.g. {"val/acc": 0.97}

    def __bool__(self) -> bool:  # no result: running, crashed, or never started
        return bool(self.outcome)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        return _from_flat(cls, data, "metrics")

    def pick(self, *keys: str) -> dict[str, Any]:
        """The fields and metrics named in `keys` that this result has, flat (for `status`)."""
        return {k: v for k, v in self.to_dict().items() if k in keys and v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "step": self.step, "epoch": self.epoch, "signal": self.signal,
                "checkpoints_committed": self.checkpoints_committed,
                **({"exit_code": self.exit_code} if self.exit_code is not None else {}), **self.metrics}


def _from_flat(cls: type, data: dict[str, Any], rest: str) -> Any:
    """A record from its flat JSON object: its own fields by name, every other key into the field `rest`."""
    known = {f.name for f in dataclasses.fields(cls)} - {rest}
    return cls(**{k: v for k, v in data.items() if k in known}, **{rest: {k: v for k, v in data.items()
                                                                          if k not in known}})


def _json_types(cls: type) -> dict[str, type]:
    """Each field's JSON type (Optional[int] -> int), so that no reader meets a string where it wants a pid."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if typing.get_origin(tp) is typing.Union:  # Optional[X]
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        out[name] = typing.get_origin(tp) or tp
    out.pop("extra", None)
    out.pop("metrics", None)
    return out


_INFO_TYPES, _RESULT_TYPES = _json_types(RunInfo), _json_types(RunResult)


def read_object(path: Path, types: dict[str, type]) -> tuple[dict[str, Any], str]:
    """The JSON object in `path` ({} if there is no file) and "", or {} and why it cannot be used."""
    try:
        data = load_record(path)  # bounded: a FIFO, /dev/zero or JSON nested 200k deep is refused, not read
    except (FileNotFoundError, NotADirectoryError):
        return {}, ""
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or not UTF-8 (a partial write)
        return {}, str(err)
    if not isinstance(data, dict):
        return {}, f"a JSON {type(data).__name__}, not an object"
    for key, kind in types.items():
        value = data.get(key)
        # bool is an int to Python, never a pid or a step
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            return {}, f"{key!r} is {value!r:.40}, not a {kind.__name__}"
    return data, ""


@dataclass(frozen=True)
class Run:
    """One run directory, the one reader of its files: `recipe()` and `cluster()` (config.yaml and
    cluster.yaml, each parsed once per Run, so a rank that passes its Run on never parses them again),
    `info()` and `result()` typed, `update()` changing run.json atomically. Open one with `Run.at`."""

    name: str
    dir: Path
    # the parsed config files by file name: filled on first use, never compared or shown
    _configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def at(cls, folder: Path | str) -> "Run":
        """The run whose directory is `folder`; its name is the folder's (as the launcher names them)."""
        folder = Path(folder)
        return cls(folder.name, folder)

    @property
    def info_path(self) -> Path:
        return self.dir / RUN_JSON

    def recipe(self) -> RecipeConfig:
        """config.yaml: the resolved recipe with its secrets put back, validated again (it may have been edited)."""
        return self._config(CONFIG_YAML, RecipeConfig)

    def cluster(self) -> ClusterConfig:
        """cluster.yaml: the resolved cluster config, as `recipe()` is read."""
        return self._config(CLUSTER_YAML, ClusterConfig)

    def written_config(self, name: str) -> dict:
        """CONFIG_YAML or CLUSTER_YAML as written (secrets masked, nothing checked), {} if it cannot be
        read: for a diagnosis, which must read a run whose files are broken too."""
        try:  # bounded (a FIFO or /dev/zero is not read); RecursionError: YAML nested thousands deep
            data = yaml.safe_load(read_capped(self.dir / name, MAX_RECORD).decode(errors="replace"))
        except (OSError, ValueError, RecursionError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_configs(self, recipe: RecipeConfig, cluster: ClusterConfig) -> None:
        """config.yaml and cluster.yaml (secrets masked, their values in secrets.yaml) for the ranks to read."""
        secrets.write_configs(self.dir, {CONFIG_YAML: recipe_document(recipe), CLUSTER_YAML: to_dict(cluster)})
        self._configs.clear()  # read back from the files, as a rank would

    def _config(self, name: str, cls: type) -> Any:
        if name not in self._configs:
            self._configs[name] = load_resolved(self.dir / name, cls)
        return self._configs[name]

    def info(self) -> RunInfo:
        """run.json; empty while there is none or it cannot be read (`problems()` says why)."""
        return RunInfo.from_dict(read_object(self.info_path, _INFO_TYPES)[0])

    def result(self) -> RunResult:
        """What the trainer wrote at the end of the last launch: empty (false) while running, after a
        crash, or while the file cannot be read (`problems()` says why)."""
        return RunResult.from_dict(read_object(self.dir / RESULT_JSON, _RESULT_TYPES)[0])

    def write_result(self, result: RunResult) -> None:
        """Atomic, so `launcher status` never reads half a file."""
        replace_text(self.dir / RESULT_JSON, json.dumps(result.to_dict(), indent=2) + "\n")

    def note(self, event: str) -> None:
        """One line in rank 0's log (what `launcher logs RUN` prints), with the time: a requeue, a restart,
        a preemption."""
        self.append_log(note_line(event))

    def append_log(self, lines: str) -> None:
        """Whole lines appended to rank 0's log in one write (O_APPEND): they never cut into a line a rank is
        writing."""
        (self.dir / LOGS).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / rank_log(0), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)

    def progress_file(self, rank: int) -> Path:
        """Where rank `rank` reports its progress (jobs.progress writes it, jobs.watchdog reads it)."""
        return self.dir / PROGRESS / f"rank{rank}"

    def stacks_dir(self, attempt: int) -> Path:
        """Where every rank's stack goes when attempt `attempt` of this launch hangs."""
        return self.dir / LOGS / STACKS / f"hang-{attempt}"

    def problems(self) -> list[str]:
        """Why run.json or result.json cannot be read, for `status` to show instead of a traceback."""
        found = [(self.info_path, read_object(self.info_path, _INFO_TYPES)[1]),
                 (self.dir / RESULT_JSON, read_object(self.dir / RESULT_JSON, _RESULT_TYPES)[1])]
        return [f"{path.name} unreadable: {why}" for path, why in found if why]

    def update(self, *, remove: Iterable[str] = (), unless_set: Optional[dict[str, Any]] = None,
               **fields: Any) -> RunInfo:
        """Set `fields`, unset the fields in `remove`, and set those of `unless_set` not set yet (the
        first of several writers wins), as one atomic change to run.json."""
        with self._locked():
            info = self.readable_info().to_dict()
            for key in remove:
                info.pop(key, None)
            fields.update({k: v for k, v in (unless_set or {}).items() if info.get(k) is None})
            new = RunInfo.from_dict({**info, **fields})  # a key RunInfo lacks is kept in `extra`
            self._write_info(new.to_dict())
            return new

    def change(self, decide: Callable[[RunInfo], dict[str, Any]]) -> RunInfo:
        """Set the fields that `decide` returns for run.json as read under the lock: an update whose new
        values depend on the old ones (the first rank to begin a start decides it for every rank)."""
        with self._locked():
            info = self.readable_info()
            fields = decide(info)
            if not fields:
                return info
            new = RunInfo.from_dict({**info.to_dict(), **fields})
            self._write_info(new.to_dict())
            return new

    def readable_info(self) -> RunInfo:
        """run.json for a writer: a UsageError naming the file if it exists but cannot be read."""
        info, problem = read_object(self.info_path, _INFO_TYPES)
        if problem:  # writing over it would lose the run id and job ids it may still hold
            raise UsageError(f"{self.info_path}: unreadable: {problem}", hint="repair or delete this file "
                             f"(deleting it gives run {self.name} a new tracker run id)")
        return RunInfo.from_dict(info)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / f"{RUN_JSON}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _mode(self) -> int:
        """The permissions run.json has (0644 for a new one: mkstemp's 0600 would hide status from others)."""
        try:
            return self.info_path.stat().st_mode & 0o777
        except FileNotFoundError:
            return 0o644

    def _write_info(self, info: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{RUN_JSON}.", suffix=".tmp")  # unique per writer
        try:
            os.fchmod(fd, self._mode())
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, self.info_path)  # atomic: a reader never sees half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
