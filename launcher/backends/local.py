"""Local backend: ranks on this machine through torchrun (`torch.distributed.run`).

The launcher process stays in front of torchrun: it records its pid for `launcher cancel` and
turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a SIGTERM for torchrun, which forwards it to every
rank; the ranks then agree on a step, save and exit (torchrun itself does not forward USR1/USR2).
Each pid goes into run.json with its process start time, and both leave run.json when the run
ends: a pid reused by another process later is never taken for the run's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from launcher.backends import process_start
from schema import ClusterConfig, RecipeConfig
from schema.errors import UsageError
from launcher.runs import Run


def rank_command(recipe: RecipeConfig, run: Run) -> list[str]:
    entry = ["-m", "jobs.train", "--run-dir", str(run.dir)]
    nproc = recipe.parallel.procs_per_node
    if nproc == 1:
        return [sys.executable, *entry]  # one rank: no torchrun, no process group
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", *entry]


def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    if recipe.parallel.nodes != 1:
        raise UsageError(f"cluster config {cluster.name!r} (local) runs one node but the recipe asks for "
                         f"parallel.nodes={recipe.parallel.nodes}", hint=f"set parallel.nodes=1 or use a Slurm "
                         "cluster config (--cluster ...)")


def launch(recipe: RecipeConfig, cluster: ClusterConfig, run: Run, wait: bool = True) -> int:
    """Start the ranks and wait for them (`wait` is for the interface: a local run always waits)."""
    check(recipe, cluster)
    env = dict(os.environ)
    # 2 ranks x N intra-op threads oversubscribe small machines; torchrun would also default to 1.
    env.setdefault("OMP_NUM_THREADS", "1" if recipe.parallel.procs_per_node > 1 else env.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        del env["OMP_NUM_THREADS"]
    child = subprocess.Popen(rank_command(recipe, run), env=env)
    try:
        run.update(pid=child.pid, pid_start=process_start(child.pid), launcher_pid=os.getpid(),
                   launcher_start=process_start(os.getpid()), state="running")
        return _wait(child)
    finally:
        if child.poll() is not None:  # the ranks are gone: their pids must not outlive them in run.json
            outcome = run.result().outcome or ("failed" if child.returncode else "finished")
            run.update(remove=("pid", "pid_start", "launcher_pid", "launcher_start"), state=outcome,
                       exit_code=child.returncode)


def _wait(child: subprocess.Popen) -> int:
    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
