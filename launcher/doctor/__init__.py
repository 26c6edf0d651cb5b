"""`launcher doctor`: name what went wrong and what to do about it.

With a run: `records` reads the run directory (each rank's log from its last launch, the Slurm job's output,
run.json, result.json, the resolved config), `diagnose` turns that into findings (pure functions of the
text and records: `ranks` finds the rank that stopped first, `oom`, `device`, `collectives` and `storage`
hold the rules by family), each with its evidence as file:line and a fix. Without a run: `environment` checks what
a launch on the cluster config would need (torch and CUDA, the runs directory, the checkpoint store, the
tracker) and asks the cluster config's backend for its own checks (`Backend.environment_checks`: Slurm's
commands, the VMs over SSH), which it builds from `launcher.checks`. `findings` is what both print.
"""
