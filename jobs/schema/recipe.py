"""Recipe sections: what to train (model, data, optimizer, schedule, layout, checkpoint policy, tracking).

One frozen dataclass per section; `jobs.schema.build.build` fills them from YAML and each `check()` validates
ranges and cross-field rules, so a bad value fails before anything is started or submitted.
"""
from __future__ import annotations

import dataclasses

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from jobs.schema.checks import fraction, non_empty, non_negative, positive, seed
from jobs.schema.errors import ConfigError, short
from jobs.schema.parallel import ParallelConfig, check_block_patterns
from jobs.schema.resilience import ResilienceConfig
from jobs.schema.script import ScriptConfig

# `package.module:attribute.path`: the module is imported, the attribute looked up in it (jobs.targets).
_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Built-in names are entries of the same mechanism: `model.name: vgg` is the target `jobs.models:vgg`.
BUILTIN_MODELS = {"vgg": "jobs.models:vgg", "cnn": "jobs.models:cnn"}
BUILTIN_DATA = {"digits": "jobs.data:digits", "synthetic": "jobs.data:synthetic",
                "image_folder": "jobs.data:image_folder"}
DEFAULT_LOSS = "torch.nn.functional:cross_entropy"
ACCURACY = "jobs.training.objective:accuracy"


def check_target(src: str, key: str, value: Optional[str]) -> None:
    """An import path is checked for its form when loaded; whether it imports is checked before launch."""
    if value is not None and not _TARGET.match(value):
        raise ConfigError(src, key, f"{short(value)} is not an import path",
                          "write module.path:attribute, e.g. mypkg.nets:build")


def check_factory(src: str, section: str, target: Optional[str], kwargs: dict[str, Any], built_in: str) -> None:
    """A section that builds something (model, data): `target` is an import path, and `kwargs` only go
    to a target (a built-in one is configured by the section's own keys)."""
    check_target(src, f"{section}.target", target)
    if target is None and kwargs:
        raise ConfigError(src, f"{section}.kwargs", f"arguments for a built-in {built_in}",
                          f"set {section}.target, or use the {section}.* keys of the built-in {built_in}")


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["vgg", "cnn"] = "cnn"  # built-in model family (ignored when target is set)
    target: Optional[str] = None  # "pkg.module:fn": a callable returning an nn.Module, called with kwargs
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of target
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

    @property
    def factory(self) -> str:
        """The import path that builds the model: the user's target or the built-in family's."""
        return self.target or BUILTIN_MODELS[self.name]

    def check(self, src: str) -> None:
        check_factory(src, "model", self.target, self.kwargs, "model")
        if self.variant not in ("vgg11", "vgg13", "vgg16", "vgg19"):
            raise ConfigError(src, "model.variant", f"unknown VGG variant {short(self.variant)}",
                              "use one of vgg11, vgg13, vgg16, vgg19")
        non_empty(src, "model.pretrained", self.pretrained)
        for i, prefix in enumerate(self.freeze):
            non_empty(src, f"model.freeze[{i}]", prefix)  # an empty prefix would freeze every parameter
        positive(src, "model.width", self.width)
        for key in ("hidden", "num_classes", "in_channels", "image_size", "pool_size"):
            positive(src, f"model.{key}", getattr(self, key))
        if self.name == "vgg" and self.image_size < 32:
            raise ConfigError(src, "model.image_size", f"{self.image_size} is too small for VGG's 5 poolings",
                              "use image_size >= 32")
        fraction(src, "model.dropout", self.dropout)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic", "image_folder"] = "digits"  # built-in data set (ignored when target is set)
    target: Optional[str] = None  # "pkg.module:fn": a callable returning (train_dataset, val_dataset)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of target
    root: Optional[str] = None  # image_folder: local path or fsspec URI, one subfolder per class
    classes: Optional[tuple[int, ...]] = None  # digits: keep only these labels, relabelled 0..k-1 in this order
    val_fraction: float = 0.2  # share of samples held out for validation
    split_seed: int = 0  # seed of the train/validation split (independent of the training seed)
    num_samples: int = 512  # synthetic: samples in the data set
    num_workers: int = 0  # DataLoader worker processes per rank

    @property
    def factory(self) -> str:
        """The import path that builds the data sets: the user's target or the built-in data set's."""
        return self.target or BUILTIN_DATA[self.name]

    def check(self, src: str) -> None:
        check_factory(src, "data", self.target, self.kwargs, "data set")
        if self.target is None and self.name == "image_folder" and not self.root:
            raise ConfigError(src, "data.root", "image_folder needs a root", "set data.root=/path/or/s3://bucket/dir")
        non_empty(src, "data.root", self.root)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(src, "data.val_fraction",
                              f"{short(self.val_fraction)} must be between 0 and 1 (exclusive)")
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c <= 9]
            if bad or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
                raise ConfigError(src, "data.classes",
                                  f"{short(list(self.classes))} must be >= 2 distinct digits 0..9")
        seed(src, "data.split_seed", self.split_seed)
        positive(src, "data.num_samples", self.num_samples)
        non_negative(src, "data.num_workers", self.num_workers)


@dataclass(frozen=True)
class LossConfig:
    target: str = DEFAULT_LOSS  # "pkg.module:fn": fn(outputs, targets, **kwargs) -> the batch's mean loss
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of target

    def check(self, src: str) -> None:
        check_target(src, "loss.target", self.target)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 0.0  # decoupled for AdamW, L2 for SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas

    def check(self, src: str) -> None:
        positive(src, "optim.lr", self.lr)
        non_negative(src, "optim.weight_decay", self.weight_decay)
        fraction(src, "optim.momentum", self.momentum)
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
        non_negative(src, "schedule.warmup_steps", self.warmup_steps)
        fraction(src, "schedule.min_lr_ratio", self.min_lr_ratio)
        positive(src, "schedule.step_size", self.step_size)
        positive(src, "schedule.gamma", self.gamma)


@dataclass(frozen=True)
class TrainerConfig:
    epochs: Optional[int] = None  # passes over the training set (one of epochs / max_steps)
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs when both are set
    global_batch: int = 64  # samples per optimizer step over all ranks
    # samples per forward/backward on one rank; auto: the largest that fits in memory, searched before the
    # first step, agreed by the ranks and lowered on an out-of-memory error (accumulation keeps global_batch)
    micro_batch: Union[int, Literal["auto"]] = 32
    grad_accum: Optional[int] = None  # micro-steps per optimizer step; derived when unset
    # autocast dtype; fp16 uses a GradScaler (CUDA only); fp8: float8 matmuls (torchao) under bf16, H100-class GPUs
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    grad_clip: Optional[float] = None  # max global gradient norm
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of every epoch
    seed: int = 0  # seeds model init, data order and dropout
    deterministic: bool = True  # deterministic kernels (needed for bit-exact resume)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available, logged at start
    # slow-rank report (jobs.training.slow_ranks): WARNING when a rank's compute time per step is more than this
    # many times the median of the other ranks', over a log interval; 0 = not measured
    slow_rank_factor: float = 1.5
    compile: bool = False  # torch.compile each block (the model's repeated layers) after parallelism is applied
    compile_exclude: tuple[str, ...] = ()  # blocks left eager: name patterns ("layers.3") or class names

    def check(self, src: str) -> None:
        check_block_patterns(src, "trainer.compile_exclude", self.compile_exclude)
        if self.compile_exclude and not self.compile:
            raise ConfigError(src, "trainer.compile_exclude", "is only read with trainer.compile=true",
                              "set trainer.compile=true, or drop trainer.compile_exclude")
        if self.precision == "fp8" and self.device == "cpu":
            raise ConfigError(src, "trainer.precision", "fp8 needs an H100-class GPU (float8 matmuls), and "
                              "trainer.device is cpu", "use trainer.precision=bf16 on the CPU")
        if self.slow_rank_factor != 0 and not self.slow_rank_factor > 1:  # also refuses nan
            raise ConfigError(src, "trainer.slow_rank_factor", f"{short(self.slow_rank_factor)} must be above 1, or "
                              "0 to turn the slow-rank report off", "e.g. trainer.slow_rank_factor=1.5")
        if self.epochs is None and self.max_steps is None:
            raise ConfigError(src, "trainer", "neither epochs nor max_steps is set", "set trainer.epochs or trainer.max_steps")
        for key in ("epochs", "max_steps", "grad_accum", "global_batch", "micro_batch"):
            if getattr(self, key) not in (None, "auto"):
                positive(src, f"trainer.{key}", getattr(self, key))
        if self.grad_clip is not None:
            positive(src, "trainer.grad_clip", self.grad_clip)
        non_negative(src, "trainer.eval_every", self.eval_every)
        seed(src, "trainer.seed", self.seed)


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
        non_empty(src, "checkpoint.uri", self.uri)
        non_empty(src, "checkpoint.best_metric", self.best_metric)
        non_negative(src, "checkpoint.every_steps", self.every_steps)
        non_negative(src, "checkpoint.every_minutes", self.every_minutes)
        positive(src, "checkpoint.keep_last", self.keep_last)
        positive(src, "checkpoint.queue_size", self.queue_size)
        positive(src, "checkpoint.upload_retries", self.upload_retries)
        positive(src, "checkpoint.flush_timeout_s", self.flush_timeout_s)


@dataclass(frozen=True)
class LoggingConfig:
    tracker: Literal["none", "wandb", "tensorboard"] = "none"  # experiment tracker (rank 0)
    project: str = "launcher"  # wandb project
    log_every: int = 10  # log train metrics every N optimizer steps
    progress_bar: bool = True  # tqdm bar on rank 0 when attached to a terminal

    def check(self, src: str) -> None:
        non_empty(src, "logging.project", self.project)
        positive(src, "logging.log_every", self.log_every)


# what only the built-in trainer reads: a script recipe leaves them unset (unchecked, not shown)
TRAINER_SECTIONS = ("model", "data", "loss", "metrics", "optim", "schedule", "trainer")
@dataclass(frozen=True)
class RecipeConfig:
    name: str  # recipe name; the default run name derives from it
    description: str = ""  # one line shown by `launcher show`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # evaluation metrics, name -> "pkg.module:fn"; fn(outputs, targets) gives one value per sample or the
    # batch's mean; logged as val/<name>. Unset: accuracy (val/acc) for the built-in data sets, none otherwise.
    metrics: Optional[dict[str, str]] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # hang timeout and restart budgets, for the trainer and scripts alike (jobs.schema.resilience)
    # unset keeps the config hash (and default run name) of recipes written before the section existed
    resilience: Optional[ResilienceConfig] = None
    # run this script on every rank instead of the trainer (model, data, optim, ... are then unused)
    script: Optional[ScriptConfig] = None
    # the user's code: first on every rank's import path; relative to the launch directory (default: it)
    code_dir: Optional[str] = None

    @property
    def resilient(self) -> ResilienceConfig:
        """The resilience section, its defaults where the recipe has none."""
        return self.resilience or ResilienceConfig()

    @property
    def eval_metrics(self) -> dict[str, str]:
        """The metrics evaluation computes besides val/loss: name -> import path."""
        if self.metrics is not None:
            return self.metrics
        return {} if self.data.target else {"acc": ACCURACY}

    @property
    def replica_batch(self) -> int:
        """Samples per optimizer step on one data-parallel replica: global batch / data-parallel size."""
        return self.trainer.global_batch // self.parallel.data_parallel_size

    @property
    def grad_accum(self) -> Optional[int]:
        """Micro-steps per optimizer step: global batch / (micro batch x data-parallel size); None under
        micro_batch=auto (the rank decides, see jobs.training.batch)."""
        if self.trainer.micro_batch == "auto":
            return None
        return self.replica_batch // self.trainer.micro_batch

    def on_nodes(self, nodes: int) -> "RecipeConfig":
        """This recipe on `nodes` nodes (a run resumed on the VMs that came back, vms.min_nodes): the same
        global batch, split over fewer replicas, so each accumulates more micro-batches per step."""
        return dataclasses.replace(self, parallel=dataclasses.replace(self.parallel, nodes=nodes))

    def check(self, src: str) -> None:
        non_empty(src, "name", self.name)
        non_empty(src, "code_dir", self.code_dir)
        for section in (self.parallel, self.checkpoint, self.logging, self.resilient):
            section.check(src)
        if self.script is not None:  # the script trains: the trainer's sections are not used
            self.script.check(src)
            return
        self._check_training(src)

    def _check_training(self, src: str) -> None:
        """The sections and rules of the built-in trainer."""
        for name, path in (self.metrics or {}).items():
            check_target(src, f"metrics.{name}", path)
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "loss":
                raise ConfigError(src, f"metrics.{name}", "a metric name is letters, digits and _ (not loss)",
                                  "e.g. metrics.mae=mypkg.metrics:mae (logged as val/mae)")
        for name in TRAINER_SECTIONS:
            if name != "metrics":  # a dict of import paths, checked above
                getattr(self, name).check(src)
        measured = ["val/loss", *(f"val/{name}" for name in self.eval_metrics)]
        if self.checkpoint.best_metric is not None and self.checkpoint.best_metric not in measured:
            raise ConfigError(src, "checkpoint.best_metric", f"{short(self.checkpoint.best_metric)} is not evaluated",
                              f"evaluation gives {', '.join(measured)}; add a metric under metrics: to rank by it")
        if self.trainer.micro_batch == "auto":
            self._check_auto(src)
        else:
            self._check_batch(src)
        if self.parallel.strategy == "fsdp":
            self._check_fsdp(src)
        if self.parallel.strategy == "pipeline":
            self._check_pipeline(src)
        if self.model.pretrained is None and self.model.freeze:
            raise ConfigError(src, "model.freeze", "freezing layers of a model trained from scratch",
                              "set model.pretrained or drop model.freeze")

    def _check_batch(self, src: str) -> None:
        """A fixed micro batch: the global batch is a whole number of micro batches on every replica."""
        t, world = self.trainer, self.parallel.data_parallel_size
        per_step = t.micro_batch * world
        if t.global_batch % per_step:
            raise ConfigError(
                src, "trainer.global_batch",
                f"{t.global_batch} is not divisible by micro_batch x data-parallel size = {t.micro_batch} x {world} = "
                f"{per_step}",
                f"use a global_batch that is a multiple of {per_step}, or change trainer.micro_batch / parallel.*")
        if t.grad_accum is not None and t.grad_accum != self.grad_accum:
            raise ConfigError(
                src, "trainer.grad_accum",
                f"{t.grad_accum} disagrees with global_batch / (micro_batch x data-parallel size) = {self.grad_accum}",
                "leave trainer.grad_accum unset to derive it")

    def _check_auto(self, src: str) -> None:
        """micro_batch=auto: the global batch splits evenly over the replicas; the rank derives the rest."""
        t, world = self.trainer, self.parallel.data_parallel_size
        if t.global_batch % world:
            raise ConfigError(src, "trainer.global_batch", f"{t.global_batch} is not divisible by the "
                              f"{world} data-parallel ranks", f"use a multiple of {world}")
        if t.grad_accum is not None:
            raise ConfigError(src, "trainer.grad_accum", f"{t.grad_accum} with trainer.micro_batch=auto (the "
                              "accumulation follows the micro batch found)", "leave trainer.grad_accum unset")
        if self.parallel.strategy in ("fsdp", "pipeline"):
            raise ConfigError(src, "trainer.micro_batch", f"auto with parallel.strategy={self.parallel.strategy} "
                              "is not built yet (its forward pass is a collective: one rank's out-of-memory "
                              "error would stall the others)", "set trainer.micro_batch to a number")

    def _check_pipeline(self, src: str) -> None:
        """What the pipeline trainer cannot do with this config (the stages all see the whole batch)."""
        t, pieces, replicas = self.trainer, self.parallel.microbatches, self.parallel.data_parallel_size
        if self.grad_accum != 1:  # the pipeline's microbatches take the place of gradient accumulation
            raise ConfigError(src, "trainer.global_batch", f"{t.global_batch} is {self.grad_accum} micro batches of "
                              f"{t.micro_batch} per replica: a pipeline does not accumulate gradients (every stage "
                              "sees its replica's whole batch)", f"set trainer.micro_batch="
                              f"{t.global_batch // replicas} and split it with parallel.microbatches")
        if t.micro_batch % pieces:
            raise ConfigError(src, "parallel.microbatches", f"{pieces} does not divide trainer.micro_batch="
                              f"{t.micro_batch} into equal pieces", "use a divisor of trainer.micro_batch")
        if t.precision != "fp32":
            raise ConfigError(src, "trainer.precision", f"{t.precision} with parallel.strategy=pipeline is not "
                              "built yet (the schedule runs the forward passes itself)", "use trainer.precision=fp32")
        if self.model.factory == "jobs.gpt:gpt" and self.model.kwargs.get("tied_embeddings", True):
            raise ConfigError(src, "model.kwargs.tied_embeddings", "the tied embedding and output weights would "
                              "sit on the first and the last stage (their gradient would have to be summed "
                              "across stages, which is not built)", "set model.kwargs.tied_embeddings=false")

    def _check_fsdp(self, src: str) -> None:
        """What FSDP cannot do with this trainer config (a device chosen by `auto` is checked on the rank)."""
        check_target(src, "parallel.tp_plan", self.parallel.tp_plan)
        if self.parallel.mixed_precision and self.trainer.device == "cpu":
            raise ConfigError(src, "parallel.mixed_precision", "needs CUDA, and trainer.device is cpu",
                              "set parallel.mixed_precision=false (trainer.precision=bf16 autocasts on the CPU)")
        if self.trainer.precision == "fp8" and self.parallel.tensor_parallel > 1:
            raise ConfigError(src, "trainer.precision", "fp8 with parallel.tensor_parallel > 1 is not built (the "
                              "split layers would need float8 tensor-parallel styles)", "use trainer.precision=bf16")
        if self.trainer.precision == "fp16":
            raise ConfigError(src, "trainer.precision", "fp16 with parallel.strategy=fsdp: the gradient scaler "
                              "would skip steps rank by rank", "use trainer.precision=bf16, or "
                              "parallel.mixed_precision=true on CUDA")
