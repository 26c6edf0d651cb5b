"""Scheduler environments: the one place in `jobs/` that knows which scheduler started the ranks.

Each module here is the rank-side half of a backend (Lightning's `ClusterEnvironment` plays the same
part): it maps its scheduler's variables to torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR/PORT`) before the trainer starts, and decides what the scheduler should do once the
trainer returns (requeue, stop). Everything else in `jobs/` reads `jobs.env.RankEnv` only.

- `slurm`: ranks started by srun (from submitit's batch script or `launcher sbatch`'s), requeues.
- `vms`: the node agent on each VM: one torchrun per node (c10d rendezvous on node 0), spot notices to the
  ranks, orders from the run's supervisor over SSH.
- `spot`: the spot/preemption notice watcher (GCE metadata, AWS IMDSv2) that the node agent runs.
- `skypilot`: a SkyPilot node's entry: SkyPilot's variables to torchrun's options, the run keyed by task id.

Local ranks need no module: torchrun already sets torchrun's variables.
"""
