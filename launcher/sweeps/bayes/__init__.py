"""Bayesian sweeps: Optuna's seeded TPE over `--param` distributions, trials pruned by ASHA.

    launcher sweep digits --search bayes --param optim.lr=loguniform:1e-4:1e-1 --trials 20 --prune

The study is a journal file, `<runs_dir>/sweeps/<sweep>/study.journal` (`jobs.schema.study`): appends under a
lock file, so every worker on every node that shares the file system uses it, with no database server.
A trial is an ordinary run `<sweep>-tNN`, NN its Optuna trial number; its run directory holds the
trial's overrides (config.yaml) and trial.json, through which rank 0 reports each evaluation (and, with
`--prune`, asks the pruner: asynchronous successive halving, `jobs.schema.study`).

A worker loops: claim a trial, run it, tell the study how it ended, until the budget (`--trials`, every
trial the study holds) is spent. Claiming takes the worker's own unfinished trial first (one that was
preempted or killed mid-run resumes as the same trial, from its checkpoints), else asks for a new one.
Locally `launcher sweep` is the one worker, trials one after another; on Slurm every element of a job
array is a worker (`launcher.sweeps.worker`), `--workers` of them; on VMs the workers run on node 0 of the pool,
each with its slot of VMs, and the study lives in the object store (`launcher.vms.sweep`, `jobs.study_store`).

Seeded: trial n of worker w is sampled by a TPESampler seeded with (seed, w, n), and TPE's draw depends
only on that and the study's history, so one worker suggests the same sequence for the same seed, even
when the sweep was stopped and started again in between (one sampler for the whole sweep would restart
its random stream at every start).

- `spec`: what the user asked for, trial names, the distributions;
- `claims`: a worker's loop (claim, run, tell) and the seeded sampler;
- `launch`: `launcher sweep --search bayes`;
- `status`: `launcher sweep-status`.
"""
from launcher.sweeps.bayes.claims import WORKER_JSON, Sweep, sampler_for, work
from launcher.sweeps.bayes.launch import run_bayes
from launcher.sweeps.bayes.spec import BayesSpec, default_name, trial_name
from launcher.sweeps.bayes.status import is_bayes, print_status, summarize, table_record

__all__ = ["WORKER_JSON", "BayesSpec", "Sweep", "default_name", "is_bayes", "print_status", "run_bayes",
           "sampler_for", "summarize", "table_record", "trial_name", "work"]
