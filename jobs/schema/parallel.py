"""The `parallel` section: how the model is spread over ranks (DDP, FSDP, a pipeline of stages)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

from jobs.schema.checks import non_empty, positive
from jobs.schema.errors import ConfigError, short

_BLOCK_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[\]!]+(\.[A-Za-z0-9_*?\[\]!]+)*$")
# One stage per rank: the schedules whose gloo hangs were fixed (pytorch PR #152938, in torch 2.13).
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
# Several stages per rank: not built here, and not shown to work over gloo (jobs.parallel.pipeline refuses them too).
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble",
                         "dualpipev")
# parallel.nccl_error_handling -> TORCH_NCCL_ASYNC_ERROR_HANDLING (torch's ErrorHandlingMode, ProcessGroupNCCL.hpp)
NCCL_ERROR_HANDLING = {"tear_down": "1", "clean_up_only": "2", "skip_clean_up": "3", "off": "0"}
MAX_TIMEOUT_S = 7 * 24 * 3600
_PIPELINE_KEYS = {"pipeline_schedule": "gpipe", "microbatches": 1, "split_points": None, "pipeline_stages": None}


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["ddp", "fsdp", "pipeline"] = "ddp"  # how the model is spread over ranks
    nodes: int = 1  # machines
    procs_per_node: int = 1  # ranks per machine (one per GPU on GPU machines)
    # fsdp: the modules sharded apart, one communication group each: name patterns matched part by part
    # ("layers.*" is layers.0, layers.1, ...) or class names ("Block"); empty: the model's repeated layers
    fsdp_blocks: tuple[str, ...] = ()
    mixed_precision: bool = False  # fsdp, CUDA only: compute in bf16 parameters, reduce gradients in fp32
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer state live in CPU memory
    # pipeline: one stage per rank; with more ranks than stages, each stage has world_size / stages replicas that
    # train on their own share of the batch and average gradients (pipeline x data parallel, jobs.parallel.pipeline)
    pipeline_stages: Optional[int] = None  # pipeline: stages (at least 2, dividing the world size); unset: world size
    pipeline_schedule: str = "gpipe"  # pipeline: gpipe or 1f1b (multi-stage schedules are refused)
    microbatches: int = 1  # pipeline: pieces each micro batch is cut into to keep the stages busy
    # pipeline: the block each stage after the first starts at ("layers.2"); unset: balanced by parameters
    split_points: Optional[tuple[str, ...]] = None
    # activations kept for the backward pass: none recomputes nothing; full keeps only each block's input and
    # recomputes the block in the backward pass; selective recomputes part (parallel.selective_ac)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # selective: "op" keeps every matmul's output but every second one and attention's (torchtitan's op-level
    # policy) and recomputes the cheap element-wise ops; N: every Nth block fully checkpointed, the others not
    selective_ac: Union[int, Literal["op"]] = "op"
    # fsdp: ranks that split each layer's weights and compute (tensor parallelism, innermost: ranks r and r+1
    # of a group); FSDP shards over the world_size / tensor_parallel replicas, which read their own data
    tensor_parallel: int = 1
    # how the layers are split: "pkg.module:function" called with (model, tensor_parallel) returning
    # {module name pattern: "colwise" | "rowwise" (or a torch ParallelStyle)}; unset: the model's own
    # tensor_parallel_plan(tensor_parallel) method (jobs.gpt's GPT has one)
    tp_plan: Optional[str] = None
    # a collective that waits longer than this fails the run (init_process_group's timeout, NCCL and gloo alike)
    collective_timeout_s: float = 600.0
    # what NCCL does with a timed-out or failed collective (TORCH_NCCL_ASYNC_ERROR_HANDLING, set on every rank of
    # every backend): tear_down ends the process, clean_up_only aborts the communicator, off waits on
    nccl_error_handling: Literal["tear_down", "clean_up_only", "skip_clean_up", "off"] = "tear_down"

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def stages(self) -> int:
        """Pipeline stages: parallel.pipeline_stages, or one per rank; 1 without a pipeline."""
        if self.strategy != "pipeline":
            return 1
        return self.pipeline_stages if self.pipeline_stages is not None else self.world_size

    @property
    def data_parallel_size(self) -> int:
        """Ranks that each train on their own share of the batch: every rank; in a pipeline, the replicas
        of a stage (the stages of one replica all see the same batch); with tensor parallelism, the groups
        (the ranks of one group all see the same batch)."""
        return max(1, self.world_size // self.stages // self.tensor_parallel)

    def rank_environment(self) -> dict[str, str]:
        """The variables torch reads when a rank makes its process group (the trainer's and a script's alike)."""
        return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ERROR_HANDLING[self.nccl_error_handling]}

    def check(self, src: str) -> None:
        if not 0 < self.collective_timeout_s <= MAX_TIMEOUT_S:  # also refuses nan and inf
            raise ConfigError(src, "parallel.collective_timeout_s", f"{short(self.collective_timeout_s)} must be > 0 "
                              f"and at most {MAX_TIMEOUT_S} (a week)",
                              "e.g. parallel.collective_timeout_s=600 (seconds a collective may wait for a peer)")
        positive(src, "parallel.nodes", self.nodes)
        positive(src, "parallel.procs_per_node", self.procs_per_node)
        if self.strategy == "pipeline":
            self._check_pipeline(src)
        else:
            for key, unset in _PIPELINE_KEYS.items():
                if getattr(self, key) != unset:
                    raise ConfigError(src, f"parallel.{key}", f"is only read with parallel.strategy=pipeline, not "
                                      f"{self.strategy}", f"set parallel.strategy=pipeline, or drop parallel.{key}")
        self._check_tensor(src)
        if self.strategy != "fsdp":
            for key in ("fsdp_blocks", "mixed_precision", "cpu_offload"):
                if getattr(self, key):
                    raise ConfigError(src, f"parallel.{key}", f"is only read with parallel.strategy=fsdp, "
                                      f"not {self.strategy}", f"set parallel.strategy=fsdp, or drop parallel.{key}")
        check_block_patterns(src, "parallel.fsdp_blocks", self.fsdp_blocks)
        self._check_activation_checkpointing(src)

    def _check_activation_checkpointing(self, src: str) -> None:
        if self.activation_checkpointing != "selective" and self.selective_ac != "op":
            raise ConfigError(src, "parallel.selective_ac", "is only read with parallel.activation_checkpointing="
                              f"selective, not {self.activation_checkpointing}",
                              "set parallel.activation_checkpointing=selective, or drop parallel.selective_ac")
        if self.selective_ac != "op":
            positive(src, "parallel.selective_ac", self.selective_ac)

    def _check_tensor(self, src: str) -> None:
        positive(src, "parallel.tensor_parallel", self.tensor_parallel)
        if self.tensor_parallel == 1:
            if self.tp_plan is not None:
                raise ConfigError(src, "parallel.tp_plan", "is only read with parallel.tensor_parallel > 1",
                                  "set parallel.tensor_parallel=2 or more, or drop parallel.tp_plan")
            return
        if self.strategy != "fsdp":
            # FSDP2 shards the tensor-parallel weights over the other mesh dimension and DCP reshards its
            # checkpoints to any layout; DDP and pipeline stages over a 2-D mesh are not built
            raise ConfigError(src, "parallel.tensor_parallel", f"{self.tensor_parallel} with parallel.strategy="
                              f"{self.strategy}: tensor parallelism is built on FSDP only (FSDP shards over the "
                              "data-parallel dimension)", "set parallel.strategy=fsdp, or parallel.tensor_parallel=1")
        if self.world_size % self.tensor_parallel:
            raise ConfigError(src, "parallel.tensor_parallel", f"{self.tensor_parallel} does not divide the world "
                              f"size {self.world_size} (nodes x procs_per_node): every data-parallel replica is "
                              "a whole tensor-parallel group", f"use a divisor of {self.world_size}, or change "
                              "parallel.nodes / parallel.procs_per_node")

    def _check_pipeline(self, src: str) -> None:
        if self.pipeline_schedule in MULTI_STAGE_SCHEDULES:
            raise ConfigError(src, "parallel.pipeline_schedule", f"{short(self.pipeline_schedule)} runs several stages "
                              "per rank, which is not built yet (and over gloo only the single-stage schedules' hangs "
                              "were fixed, pytorch PR #152938)", f"use one of {', '.join(PIPELINE_SCHEDULES)}")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(src, "parallel.pipeline_schedule", f"unknown schedule {short(self.pipeline_schedule)}",
                              f"use one of {', '.join(PIPELINE_SCHEDULES)}")
        positive(src, "parallel.microbatches", self.microbatches)
        if self.pipeline_stages is not None:
            self._check_stages(src)
        elif self.world_size < 2:
            raise ConfigError(src, "parallel.strategy", f"a pipeline needs at least 2 ranks (one stage each), "
                              f"the world size is {self.world_size}", "set parallel.procs_per_node=2 or more, "
                              "or parallel.strategy=ddp")
        if self.split_points is not None:
            for i, point in enumerate(self.split_points):
                non_empty(src, f"parallel.split_points[{i}]", point)
            if len(self.split_points) + 1 != self.stages:
                raise ConfigError(src, "parallel.split_points", f"{len(self.split_points)} split points make "
                                  f"{len(self.split_points) + 1} stages, but the pipeline has {self.stages} "
                                  f"({self._stages_from()})", f"give {self.stages - 1} split points, or leave "
                                  "parallel.split_points unset to balance the stages")

    def _check_stages(self, src: str) -> None:
        stages, world = self.pipeline_stages, self.world_size
        if stages < 2:
            raise ConfigError(src, "parallel.pipeline_stages", f"{short(stages)}: a pipeline needs at least 2 stages",
                              "set parallel.pipeline_stages=2 or more, or parallel.strategy=ddp")
        if world % stages:
            raise ConfigError(src, "parallel.pipeline_stages", f"{stages} stages do not divide the world size "
                              f"{world} (nodes x procs_per_node): every stage needs as many replicas",
                              f"use a divisor of {world}, or change parallel.nodes / parallel.procs_per_node")

    def _stages_from(self) -> str:
        return "parallel.pipeline_stages" if self.pipeline_stages is not None else "one per rank, world size"


def check_block_patterns(src: str, key: str, patterns: tuple[str, ...]) -> None:
    """Module name patterns ("layers.*") or class names, as parallel.fsdp_blocks and trainer.compile_exclude take."""
    for i, pattern in enumerate(patterns):
        if not _BLOCK_PATTERN.match(pattern):
            raise ConfigError(src, f"{key}[{i}]", f"{short(pattern)} is not a module name pattern or class name",
                              'e.g. "layers.*", "features.0" or "TransformerBlock"')
