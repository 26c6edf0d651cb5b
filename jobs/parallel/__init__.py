"""Distributed setup and parallelism, applied to a plain model by functions (torchtitan's way).

- distributed: the device and process group of a rank, the trainer's own collectives;
- apply: parallelize() per `parallel.strategy` (DDP, FSDP, a pipeline stage), unwrap(), gradient_sync();
- fsdp: fully_shard per block, then the root;
- tensor: tensor parallelism, the model's plan on the tp dimension of a (dp, tp) mesh;
- pipeline: manual pipeline stages, their (pp, dp) layout and the runner that drives a schedule;
- state: each part's model and optimizer state in a layout-independent form (checkpoints).
"""
from jobs.parallel.apply import abandon_backward, data_parallel, forward_is_collective, gradient_sync, parallelize, unwrap
from jobs.parallel.distributed import all_reduce_mean, all_reduce_sum, any_rank, broadcast_flag, \
    gather_values, host_names, init_distributed, pick_device, ranks_where, shutdown
from jobs.parallel.state import load_model_state, load_optimizer_state, model_state, optimizer_state

__all__ = ["abandon_backward", "all_reduce_mean", "any_rank", "broadcast_flag", "ranks_where", "data_parallel", "all_reduce_sum", "forward_is_collective", "gather_values", "gradient_sync", "host_names", "init_distributed",
           "load_model_state", "load_optimizer_state", "model_state", "optimizer_state", "parallelize",
           "pick_device", "shutdown", "unwrap"]
