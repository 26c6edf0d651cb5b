"""Hyper-parameter sweeps: a grid or random search where every trial is an ordinary run.

    launcher sweep digits trainer.max_steps=100 --grid optim.lr=1e-3,1e-2 --grid trainer.micro_batch=16,32
    launcher sweep digits --random optim.lr=loguniform:1e-4:1e-1 --random model.dropout=uniform:0:0.5 --trials 8
    launcher sweep-status digits-sweep-1a2b3c4d

Every trial's full config is loaded and validated before anything is created or submitted. Each
trial is a normal run directory `<sweep>-tNN` (own checkpoints; `launcher status/logs/cancel` work on
it). The sweep itself is a small record, `<runs_dir>/sweeps/<sweep>.json`, naming its trials. The
default sweep name hashes the sweep spec, so re-running the same command finds the same trials and
resumes them. The trials go to the cluster config's backend as one batch (`launch_many`): on Slurm
one job array, locally one after another.

- `space`: the search space (pure): parse --grid/--random, sample, expand into trials.
- `record`: the sweep record (read, write, new).
- `trials`: validate and run the trials through the backend interface, wait for them.
- `table`: the results table, best first.
"""
