"""Scheduler environments: the one place in `jobs/` that knows which scheduler started the ranks.

Each module here is the rank-side half of a backend (Lightning's `ClusterEnvironment` plays the same
part): it maps its scheduler's variables to torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR/PORT`) before the trainer starts, and decides what the scheduler should do once the
trainer returns (requeue, stop). Everything else in `jobs/` reads `jobs.env.RankEnv` only.

- `slurm`: ranks started by srun (from submitit's batch script or `launcher sbatch`'s), requeues.

Local ranks need no module: torchrun already sets torchrun's variables.
"""
