"""Typed, frozen config sections for recipes (what to train) and cluster configs (where).

Every section is a frozen dataclass validated when it is built, so a bad value fails on the
user's machine before anything is started or submitted. Loading is generic: `build()` walks the
dataclass fields, checks types, refuses unknown keys with the list of valid ones and the closest
match, then each section's `check()` validates ranges and cross-field rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from launcher import secrets
from launcher.errors import ConfigError, short
from launcher.safe_yaml import MAX_OVERRIDE_CHARS, parse_yaml, read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "recipes"
CLUSTERS_DIR = REPO_ROOT / "cluster_configs"


# ----------------------------------------------------------------------------- recipe sections
@dataclass(frozen=True)
class ModelConfig:
    name: Literal["vgg", "cnn"] = "cnn"  # model family
    variant: str = "vgg11"  # VGG depth: vgg11, vgg13, vgg16, vgg19
    width: float = 1.0  # channel multiplier (1.0 = torchvision's widths); small values run on a CPU
    hidden: int = 4096  # width of the VGG classifier's hidden layers
    batch_norm: bool = False  # VGG with BatchNorm (vgg11_bn layout)
    num_classes: int = 10  # outputs of the classifier head
    in_channels: int = 3  # input image channels
    image_size: int = 224  # input height and width
    pool_size: int = 7  # VGG adaptive-pool output side (7 = torchvision's; smaller for small CPU models)
    dropout: float = 0.5  # dropout in the classifier
    pretrained: Optional[str] = None  # path or fsspec URI of a torchvision-format or project checkpoint
    replace_head: bool = True  # do not load the final classifier layer: fresh head for the target classes
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept frozen (e.g. "features")

    def check(self, src: str) -> None:
        if self.variant not in ("vgg11", "vgg13", "vgg16", "vgg19"):
            raise ConfigError(src, "model.variant", f"unknown VGG variant {short(self.variant)}",
                              "use one of vgg11, vgg13, vgg16, vgg19")
        _non_empty(src, "model.pretrained", self.pretrained)
        for i, prefix in enumerate(self.freeze):
            _non_empty(src, f"model.freeze[{i}]", prefix)  # an empty prefix would freeze every parameter
        _positive(src, "model.width", self.width)
        for key in ("hidden", "num_classes", "in_channels", "image_size", "pool_size"):
            _positive(src, f"model.{key}", getattr(self, key))
        if self.name == "vgg" and self.image_size < 32:
            raise ConfigError(src, "model.image_size", f"{self.image_size} is too small for VGG's 5 poolings",
                              "use image_size >= 32")
        _fraction(src, "model.dropout", self.dropout)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "image_folder"] = "digits"  # data set
    root: Optional[str] = None  # image_folder: local path or fsspec URI, one subfolder per class
    classes: Optional[tuple[int, ...]] = None  # digits: keep only these labels, relabelled 0..k-1 in this order
    val_fraction: float = 0.2  # share of samples held out for validation
    split_seed: int = 0  # seed of the train/validation split (independent of the training seed)
    num_samples: int = 512  # synthetic: samples in the data set
    num_workers: int = 0  # DataLoader worker processes per rank

    def check(self, src: str) -> None:
        if self.name == "image_folder" and not self.root:
            raise ConfigError(src, "data.root", "image_folder needs a root", "set data.root=/path/or/s3://bucket/dir")
        _non_empty(src, "data.root", self.root)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(src, "data.val_fraction",
                              f"{short(self.val_fraction)} must be between 0 and 1 (exclusive)")
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c <= 9]
            if bad or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
                raise ConfigError(src, "data.classes",
                                  f"{short(list(self.classes))} must be >= 2 distinct digits 0..9")
        _seed(src, "data.split_seed", self.split_seed)
        _positive(src, "data.num_samples", self.num_samples)
        _non_negative(src, "data.num_workers", self.num_workers)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 0.0  # decoupled for AdamW, L2 for SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas

    def check(self, src: str) -> None:
        _positive(src, "optim.lr", self.lr)
        _non_negative(src, "optim.weight_decay", self.weight_decay)
        _fraction(src, "optim.momentum", self.momentum)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(src, f"optim.betas[{i}]", f"{short(beta)} must be in [0, 1)",
                                  "AdamW's betas are decay rates, e.g. optim.betas=[0.9,0.999]")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of the peak
    step_size: int = 100  # step: decay every this many steps
    gamma: float = 0.1  # step: decay factor

    def check(self, src: str) -> None:
        _non_negative(src, "schedule.warmup_steps", self.warmup_steps)
        _fraction(src, "schedule.min_lr_ratio", self.min_lr_ratio)
        _positive(src, "schedule.step_size", self.step_size)
        _positive(src, "schedule.gamma", self.gamma)


@dataclass(frozen=True)
class TrainerConfig:
    epochs: Optional[int] = None  # passes over the training set (one of epochs / max_steps)
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs when both are set
    global_batch: int = 64  # samples per optimizer step over all ranks
    micro_batch: int = 32  # samples per forward/backward on one rank
    grad_accum: Optional[int] = None  # micro-steps per optimizer step; derived when unset
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 uses a GradScaler (CUDA only)
    grad_clip: Optional[float] = None  # max global gradient norm
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of every epoch
    seed: int = 0  # seeds model init, data order and dropout
    deterministic: bool = True  # deterministic kernels (needed for bit-exact resume)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available, logged at start

    def check(self, src: str) -> None:
        if self.epochs is None and self.max_steps is None:
            raise ConfigError(src, "trainer", "neither epochs nor max_steps is set", "set trainer.epochs or trainer.max_steps")
        for key in ("epochs", "max_steps", "grad_accum", "global_batch", "micro_batch"):
            if getattr(self, key) is not None:
                _positive(src, f"trainer.{key}", getattr(self, key))
        if self.grad_clip is not None:
            _positive(src, "trainer.grad_clip", self.grad_clip)
        _non_negative(src, "trainer.eval_every", self.eval_every)
        _seed(src, "trainer.seed", self.seed)


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["ddp", "fsdp", "pipeline"] = "ddp"  # how the model is spread over ranks
    nodes: int = 1  # machines
    procs_per_node: int = 1  # ranks per machine (one per GPU on GPU machines)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def check(self, src: str) -> None:
        if self.strategy != "ddp":
            raise ConfigError(src, "parallel.strategy", f"{self.strategy!r} is not implemented yet",
                              "use parallel.strategy=ddp")
        _positive(src, "parallel.nodes", self.nodes)
        _positive(src, "parallel.procs_per_node", self.procs_per_node)


@dataclass(frozen=True)
class CheckpointConfig:
    uri: Optional[str] = None  # where checkpoints go: path, file://, s3://, gs://, memory://; default <run_dir>/checkpoints
    every_steps: int = 0  # save every N optimizer steps (0 = off)
    every_minutes: float = 0.0  # save when this much wall time passed since the last save (0 = off)
    at_end: bool = True  # save when training finishes
    keep_last: int = 3  # committed checkpoints kept (the newest ones)
    best_metric: Optional[str] = None  # also keep the best checkpoint by this metric (e.g. val/acc)
    best_mode: Literal["max", "min"] = "max"  # whether larger or smaller best_metric is better
    async_save: bool = True  # write and upload in the background; training blocks only for the host copy
    queue_size: int = 1  # saves waiting in the background at most (bounds host memory)
    upload_retries: int = 5  # attempts per file upload before the save is left for a later retry
    flush_timeout_s: float = 120.0  # at exit / preemption: wait this long for pending uploads

    def check(self, src: str) -> None:
        _non_empty(src, "checkpoint.uri", self.uri)
        _non_empty(src, "checkpoint.best_metric", self.best_metric)
        _non_negative(src, "checkpoint.every_steps", self.every_steps)
        _non_negative(src, "checkpoint.every_minutes", self.every_minutes)
        _positive(src, "checkpoint.keep_last", self.keep_last)
        _positive(src, "checkpoint.queue_size", self.queue_size)
        _positive(src, "checkpoint.upload_retries", self.upload_retries)
        _positive(src, "checkpoint.flush_timeout_s", self.flush_timeout_s)


@dataclass(frozen=True)
class LoggingConfig:
    tracker: Literal["none", "wandb", "tensorboard"] = "none"  # experiment tracker (rank 0)
    project: str = "launcher"  # wandb project
    log_every: int = 10  # log train metrics every N optimizer steps
    progress_bar: bool = True  # tqdm bar on rank 0 when attached to a terminal

    def check(self, src: str) -> None:
        _non_empty(src, "logging.project", self.project)
        _positive(src, "logging.log_every", self.log_every)


@dataclass(frozen=True)
class RecipeConfig:
    name: str  # recipe name; the default run name derives from it
    description: str = ""  # one line shown by `launcher show`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def grad_accum(self) -> int:
        """Micro-steps per optimizer step: global batch / (micro batch x data-parallel size)."""
        return self.trainer.global_batch // (self.trainer.micro_batch * self.parallel.world_size)

    def check(self, src: str) -> None:
        _non_empty(src, "name", self.name)
        for section in (self.model, self.data, self.optim, self.schedule, self.trainer, self.parallel,
                        self.checkpoint, self.logging):
            section.check(src)
        t, world = self.trainer, self.parallel.world_size
        per_step = t.micro_batch * world
        if t.global_batch % per_step:
            raise ConfigError(
                src, "trainer.global_batch",
                f"{t.global_batch} is not divisible by micro_batch x world_size = {t.micro_batch} x {world} = {per_step}",
                f"use a global_batch that is a multiple of {per_step}, or change trainer.micro_batch / parallel.*")
        if t.grad_accum is not None and t.grad_accum != self.grad_accum:
            raise ConfigError(
                src, "trainer.grad_accum",
                f"{t.grad_accum} disagrees with global_batch / (micro_batch x world_size) = {self.grad_accum}",
                "leave trainer.grad_accum unset to derive it")
        if self.model.pretrained is None and self.model.freeze:
            raise ConfigError(src, "model.freeze", "freezing layers of a model trained from scratch",
                              "set model.pretrained or drop model.freeze")


# ----------------------------------------------------------------------------- cluster sections
@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, Ceph, moto); default AWS_ENDPOINT_URL or AWS
    region: Optional[str] = None  # S3 region; default AWS_DEFAULT_REGION
    profile: Optional[str] = None  # AWS profile name; default AWS_PROFILE

    def check(self, src: str) -> None:
        for key in ("endpoint_url", "region", "profile"):
            _non_empty(src, f"storage.{key}", getattr(self, key))
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(src, "storage.endpoint_url", f"{short(self.endpoint_url)} is not an http(s) URL")


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str] = None  # --partition
    account: Optional[str] = None  # --account
    qos: Optional[str] = None  # --qos
    time_min: int = 60  # --time, in minutes
    gpus_per_node: int = 0  # --gpus-per-node; must equal parallel.procs_per_node when > 0
    cpus_per_task: int = 1  # --cpus-per-task
    mem_gb: Optional[int] = None  # --mem per node, in GB
    constraint: Optional[str] = None  # --constraint
    exclusive: bool = False  # --exclusive
    extra_sbatch: tuple[str, ...] = ()  # further #SBATCH options, e.g. "--reservation=x"
    setup: tuple[str, ...] = ()  # shell lines run before the ranks start (module load, venv activation)
    env: dict[str, str] = field(default_factory=dict)  # environment variables passed to every rank
    grace_period_s: int = 120  # USR2 this long before the end: time to save and flush a checkpoint
    max_preemptions: int = 20  # requeues after preemption before giving up
    max_timeouts: int = 10  # requeues after hitting the time limit before giving up
    max_failures: int = 1  # requeues after a crash before giving up
    python: Optional[str] = None  # interpreter on the compute nodes; default the launching one

    def check(self, src: str) -> None:
        for key in ("partition", "account", "qos", "constraint", "python"):
            _non_empty(src, f"slurm.{key}", getattr(self, key))
        for i, option in enumerate(self.extra_sbatch):
            _non_empty(src, f"slurm.extra_sbatch[{i}]", option)
        _positive(src, "slurm.time_min", self.time_min)
        if self.time_min > _MAX_TIME_MIN:
            raise ConfigError(src, "slurm.time_min", f"{self.time_min} minutes is more than 365 days",
                              f"use at most {_MAX_TIME_MIN} (Slurm partitions usually allow far less: "
                              "see `sinfo -o %l`)")
        if self.mem_gb is not None:
            _positive(src, "slurm.mem_gb", self.mem_gb)
        _non_negative(src, "slurm.gpus_per_node", self.gpus_per_node)
        _positive(src, "slurm.cpus_per_task", self.cpus_per_task)
        _positive(src, "slurm.grace_period_s", self.grace_period_s)
        if self.time_min * 60 <= self.grace_period_s:
            raise ConfigError(src, "slurm.time_min",
                              f"{self.time_min} min is not longer than the grace period of {self.grace_period_s} s",
                              "raise slurm.time_min or lower slurm.grace_period_s")
        for key in ("max_preemptions", "max_timeouts", "max_failures"):
            _non_negative(src, f"slurm.{key}", getattr(self, key))


@dataclass(frozen=True)
class ClusterConfig:
    name: str  # config name
    backend: Literal["local", "slurm"] = "local"  # what starts the ranks
    runs_dir: str = "runs"  # run directories live here (relative to the repo root unless absolute)
    storage: StorageConfig = field(default_factory=StorageConfig)
    slurm: Optional[SlurmConfig] = None  # required when backend is slurm

    def check(self, src: str) -> None:
        _non_empty(src, "name", self.name)
        _non_empty(src, "runs_dir", self.runs_dir)
        self.storage.check(src)
        if self.backend == "slurm" and self.slurm is None:
            raise ConfigError(src, "slurm", "backend is slurm but there is no slurm: section",
                              "add a slurm: section (partition, time_min, ...)")
        if self.slurm is not None:
            self.slurm.check(src)

    def check_recipe(self, recipe: RecipeConfig, src: str) -> None:
        """Rules that need both files, e.g. one rank per GPU."""
        s = self.slurm
        if self.backend == "slurm" and s is not None and s.gpus_per_node > 0 \
                and s.gpus_per_node != recipe.parallel.procs_per_node:
            raise ConfigError(src, "slurm.gpus_per_node",
                              f"{s.gpus_per_node} GPUs per node but the recipe runs "
                              f"parallel.procs_per_node={recipe.parallel.procs_per_node} ranks per node",
                              f"set parallel.procs_per_node={s.gpus_per_node} (one rank per GPU)")


# ----------------------------------------------------------------------------- range helpers
_MAX_TIME_MIN = 365 * 24 * 60  # a year: anything longer is a typo (or seconds given as minutes)
_MAX_SEED = 2**31 - 1  # numpy seeds with seed + rank and refuses values of 2**32 and above


def _positive(src: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(src, key, f"{short(value)} must be > 0")


def _non_negative(src: str, key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(src, key, f"{short(value)} must be >= 0")


def _fraction(src: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(src, key, f"{short(value)} must be between 0 and 1")


def _seed(src: str, key: str, value: int) -> None:
    if not 0 <= value <= _MAX_SEED:
        raise ConfigError(src, key, f"{short(value)} must be between 0 and {_MAX_SEED}")


def _non_empty(src: str, key: str, value: Optional[str]) -> None:
    """Optional strings are unset (null) or say something: an empty partition or URI is a mistake."""
    if value is not None and not value.strip():
        raise ConfigError(src, key, f"{short(value)} is empty", f"set a value, or leave {key} out (null)")


# ----------------------------------------------------------------------------- generic building
def build(cls: type, data: Any, src: str, prefix: str = "") -> Any:
    """Turn a dict into dataclass `cls`, checking keys and types; `src` names the file in errors."""
    where = prefix or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(src, where, f"expected a mapping of keys, got {type(data).__name__} {short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(_word(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(src, _join(prefix, key), "unknown key",
                              f"{hint}valid keys are: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], src, _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(src, _join(prefix, name), "is required")
    return cls(**values)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _word(value: Any) -> str:
    """What difflib compares: a string's start (its cost grows with the length), nothing for other values."""
    return value[:100] if isinstance(value, str) else ""


def _convert(tp: Any, value: Any, src: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, src, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, src, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(_word(value), [str(a) for a in args], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(src, key, f"invalid value {short(value)}",
                              f"{hint}choose one of: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(src, key, f"expected a list, got {type(value).__name__} {short(value)}")
        item_types = [args[0]] * len(value) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        if len(item_types) != len(value):
            raise ConfigError(src, key, f"expected {len(item_types)} items, got {len(value)}: {short(value)}")
        return tuple(_convert(t, v, src, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(src, key, f"expected a mapping, got {type(value).__name__} {short(value)}")
        return {str(k): _scalar(str, v, src, f"{key}.{k}") for k, v in value.items()}
    return _scalar(tp, value, src, key)


_INT_BOUND = 2**63  # every int field ends up in a C int64 somewhere (torch, Slurm); beyond that it is a typo


def _scalar(tp: type, value: Any, src: str, key: str) -> Any:
    if tp is float:
        return _finite_float(value, src, key)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # env values such as 1 or 0.5
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(src, key, f"expected {tp.__name__}, got {type(value).__name__} {short(value)}")
    if tp is int and not -_INT_BOUND < value < _INT_BOUND:
        raise ConfigError(src, key, f"{short(value)} is out of range (more than 64 bits)")
    return value


def _finite_float(value: Any, src: str, key: str) -> float:
    """Every float field of every section: NaN and infinity pass `> 0` checks, so they are refused here, once."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(src, key, f"expected float, got {type(value).__name__} {short(value)}")
    try:
        number = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    except ValueError:
        raise ConfigError(src, key, f"expected float, got {type(value).__name__} {short(value)}") from None
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(src, key, f"{short(value)} is not a finite number", "use a finite value, e.g. 0.001")
    return number


# ----------------------------------------------------------------------------- files and overrides
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`trainer.epochs=2 optim.lr=1e-3` -> nested dict; values are parsed as YAML (bad syntax: a string)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError("command line", item, "an override must look like section.key=value",
                              "e.g. trainer.epochs=2")
        key, raw = item.split("=", 1)
        if len(raw) > MAX_OVERRIDE_CHARS:
            raise ConfigError("command line", key, f"value longer than {MAX_OVERRIDE_CHARS} characters",
                              "put it in a recipe file")
        try:
            value = parse_yaml(raw, "command line", key) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("command line", key, "conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def find_config(name: str, folder: Path, kind: str) -> Path:
    """A name (`digits`) is looked up in `folder` (recursively); anything with a slash or .yaml is a path.

    The name is compared with file stems, never used as a glob pattern: `*` or `[ab]` is an unknown name.
    """
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path, where = Path(name), name if name.isprintable() and len(name) <= 80 else short(name)
        try:
            found = path.is_file()
        except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
            raise ConfigError(where, "", f"cannot read {kind} file: {getattr(err, 'strerror', None) or err}") from None
        if not found:
            raise ConfigError(where, "", f"{kind} file not found")
        return path
    files = sorted(folder.rglob("*.yaml"))
    matches = [p for p in files if p.stem == name]
    if not matches:
        known = sorted(p.stem for p in files)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(str(folder), "", f"unknown {kind} {short(name)}", f"{hint}known {kind}s: {', '.join(known)}")
    return matches[0]


def load_recipe(name: str, overrides: list[str] = ()) -> RecipeConfig:
    path = find_config(name, RECIPES_DIR, "recipe")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    src = _source(path, overrides)
    recipe = build(RecipeConfig, _merge(data, parse_overrides(list(overrides))), src)
    recipe.check(src)
    return recipe


def load_cluster(name: str = "local", overrides: list[str] = ()) -> ClusterConfig:
    path = find_config(name, CLUSTERS_DIR, "cluster config")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    src = _source(path, overrides)
    cluster = build(ClusterConfig, _merge(data, parse_overrides(list(overrides))), src)
    cluster.check(src)
    return cluster


def _source(path: Path, overrides: list[str]) -> str:
    """Where a value came from, for errors; long overrides are cut so the key and the problem stay in view."""
    given = " ".join(overrides)
    given = given if len(given) <= 60 else given[:57] + "..."
    return f"{path} (with overrides {given})" if overrides else str(path)


def to_dict(cfg: Any) -> dict:
    """Plain dict (lists instead of tuples) for YAML/JSON output."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Any, redacted: bool = False) -> str:
    """YAML of a config; `redacted` masks credentials (for anything a person sees)."""
    tree = to_dict(cfg)
    return yaml.safe_dump(secrets.redact(tree) if redacted else tree, sort_keys=False)


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def load_resolved(path: Path, cls: type) -> Any:
    """Reload a resolved config written to a run directory (validated again: it may have been edited),
    with the real values of its redacted secrets put back."""
    cfg = build(cls, secrets.overlay(path, read_yaml(path)), str(path))
    cfg.check(str(path))
    return cfg
