"""SkyPilot, on each node: the `run` command of a `launcher skypilot` task file runs this module.

`python -m jobs.environments.skypilot --run-name BASE --runs-dir DIR --nproc-per-node P --master-port PORT`
prepares this node's run directory and then replaces itself with torchrun, which starts the node's ranks
(`-m jobs.train --run-dir DIR`). SkyPilot runs the same command on every node of the task.

- The run is keyed by `SKYPILOT_TASK_ID`, which a managed job keeps across its recoveries: every node,
  on every recovery, derives the same run name (`BASE-<hash of the task id>`) and run id from it, so a
  recovered job finds its checkpoints under `checkpoint.uri` and resumes; a new `sky jobs launch` is a
  new run. No folder is shared between nodes: each node writes its own run directory under DIR, and a
  replacement VM starts with an empty one (the checkpoints come back from `checkpoint.uri`).
- The resolved recipe and cluster config come in the task file's `LAUNCHER_RUN` variable (gzip, base64,
  JSON; secrets are never in it: `launcher skypilot` refuses a recipe holding one, and secret `skypilot.env`
  entries (a credential-named key, or a value with URL user info or a `?token=`) are declared for
  `sky jobs launch --secret KEY` and masked here; SkyPilot sets them, this module never reads them).
- SkyPilot's variables map to torchrun's options in one table, `TORCHRUN_OPTIONS`.
- Spot VMs on GCP or AWS (`skypilot.use_spot`, `skypilot.cloud`): torchrun runs beside the VM backend's
  node agent, which watches the metadata service; on a notice the ranks save together, and this node
  then waits for its VM to be taken away (`run_watched`), so SkyPilot recovers the job.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from jobs.schema import ClusterConfig, RecipeConfig, UsageError, config_hash, from_document
from jobs.schema.skypilot import SkyPilotConfig
from jobs.schema.run_dir import RESULT_JSON, Run, checkpoint_uri

ENTRY_MODULE = "jobs.environments.skypilot"  # `python -m ENTRY_MODULE ...` in the task file's run command
RUN_VARIABLE = "LAUNCHER_RUN"  # the task file's envs entry holding the resolved configs
TASK_ID = "SKYPILOT_TASK_ID"
NODE_IPS = "SKYPILOT_NODE_IPS"  # one address per line, the head node first
GPUS_PER_NODE = "SKYPILOT_NUM_GPUS_PER_NODE"
# torchrun option -> SkyPilot variable; --master-addr is the first line of SKYPILOT_NODE_IPS
TORCHRUN_OPTIONS = {"--nnodes": "SKYPILOT_NUM_NODES", "--node-rank": "SKYPILOT_NODE_RANK"}
TASK_HASH_CHARS = 8  # of the run name's suffix; run ids take 12


class NodeError(RuntimeError):
    """SkyPilot's variables do not fit the recipe (e.g. `sky jobs launch --num-nodes` changed the nodes)."""


# ----------------------------------------------------------------------------- the configs in the task file
def encode_configs(recipe: dict[str, Any], cluster: dict[str, Any]) -> str:
    """The resolved configs as one line of base64 (no quoting can go wrong); mtime 0: same configs, same text."""
    text = json.dumps({"recipe": recipe, "cluster": cluster}, sort_keys=True, separators=(",", ":"))
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


def decode_configs(value: str) -> tuple[RecipeConfig, ClusterConfig]:
    try:
        data = json.loads(gzip.decompress(base64.b64decode(value, validate=True)))
    except (OSError, ValueError) as err:  # cut or edited by hand: not base64, not gzip, not JSON
        raise NodeError(f"${RUN_VARIABLE} cannot be read ({type(err).__name__}: {err}); render the task file "
                        "again with `launcher skypilot`") from None
    return (from_document(RecipeConfig, data["recipe"], f"${RUN_VARIABLE} recipe"),
            from_document(ClusterConfig, data["cluster"], f"${RUN_VARIABLE} cluster config"))


# ----------------------------------------------------------------------------- names from the task id
def task_hash(task_id: str) -> str:
    return hashlib.sha256(task_id.encode()).hexdigest()


def run_name(base: str, task_id: str) -> str:
    """The same on every node and every recovery of one managed job; another job, another run."""
    return f"{base}-{task_hash(task_id)[:TASK_HASH_CHARS]}"


def run_id(task_id: str) -> str:
    return f"sky-{task_hash(task_id)[:12]}"


# ----------------------------------------------------------------------------- SkyPilot -> torchrun
def torchrun_options(environ: Mapping[str, str], nodes: int, nproc: int, port: int) -> list[str]:
    """torchrun's node options from SkyPilot's variables, checked against the recipe's layout."""
    values = {option: _variable(environ, name) for option, name in TORCHRUN_OPTIONS.items()}
    if values["--nnodes"] != str(nodes):
        raise NodeError(f"SkyPilot started {values['--nnodes']} nodes but the recipe runs parallel.nodes={nodes}; "
                        "launch the task file without --num-nodes (or render it again for that many nodes)")
    gpus = environ.get(GPUS_PER_NODE, "0") or "0"
    if gpus != "0" and gpus != str(nproc):
        raise NodeError(f"this node has {gpus} GPUs but the recipe runs parallel.procs_per_node={nproc} ranks "
                        "per node; launch the task file without --gpus (or render it again)")
    head = _variable(environ, NODE_IPS).split()[0]
    return [*(f"{option}={value}" for option, value in values.items()), f"--nproc-per-node={nproc}",
            f"--master-addr={head}", f"--master-port={port}"]


def _variable(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise NodeError(f"${name} is not set: this command runs inside a SkyPilot task (sky jobs launch)")
    return value


# ----------------------------------------------------------------------------- this node's run directory
def prepare(recipe: RecipeConfig, cluster: ClusterConfig, runs_dir: Path, name: str, task_id: str) -> Run:
    """This node's run directory for this (re)start: configs, and run.json with the task's run id."""
    run = Run.at(runs_dir / name)
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / RESULT_JSON).unlink(missing_ok=True)  # the previous start's, on a node that survived it
    run.write_configs(recipe, cluster)
    previous = run.readable_info()
    run.update(remove=("exit_code", "failed_rank"), run_name=name, run_id=run_id(task_id), recipe=recipe.name,
               cluster=cluster.name, backend="local",  # on the node: torchrun started here, as a local run
               resume="auto", checkpoint_uri=checkpoint_uri(recipe, name), config_hash=config_hash(recipe),
               code_dir=str(Path(recipe.code_dir or ".").expanduser().resolve()), state="running",
               created=previous.created or time.strftime("%Y-%m-%dT%H:%M:%S"), launches=previous.launches + 1,
               skypilot_task_id=task_id)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="start this SkyPilot node's ranks (the task file's run command)")
    parser.add_argument("--run-name", required=True, help="the run's name before the task id's hash")
    parser.add_argument("--runs-dir", required=True, help="this node's folder for run directories (~ expanded)")
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--master-port", type=int, required=True)
    args = parser.parse_args(argv)
    environ = os.environ
    try:
        recipe, cluster = decode_configs(_variable(environ, RUN_VARIABLE))
        task_id = _variable(environ, TASK_ID)
        options = torchrun_options(environ, recipe.parallel.nodes, args.nproc_per_node, args.master_port)
    except (NodeError, UsageError) as err:  # UsageError: the decoded configs fail their checks
        print(f"launcher (SkyPilot node): {err}", file=sys.stderr)
        return 2
    run = prepare(recipe, cluster, Path(args.runs_dir).expanduser().resolve(), run_name(args.run_name, task_id),
                  task_id)
    command = [sys.executable, "-m", "jobs.torchrun", *options, "--max-restarts=0",
               "-m", "jobs.train", "--run-dir", str(run.dir)]
    print(f"launcher (SkyPilot node {environ['SKYPILOT_NODE_RANK']}): run {run.name} in {run.dir}: "
          f"{' '.join(command)}", flush=True)
    sky = cluster.skypilot
    if sky is None or sky.notice_provider == "none":
        os.execv(sys.executable, command)  # torchrun in this process: SkyPilot's signals reach it directly
    return run_watched(command, run, sky, args.nproc_per_node)


def run_watched(command: list[str], run: Run, sky: SkyPilotConfig, nproc: int) -> int:
    """torchrun beside a spot notice watcher (the VM backend's node agent): on a notice the ranks save
    together. This node then waits for its VM to be taken away: exiting 0 would tell SkyPilot the job
    succeeded, and a managed job that succeeded is never recovered. A VM still there after
    skypilot.notice_hold_s exits with EX_TEMPFAIL (75)."""
    from jobs.environments.vms import Agent, stop_on_signals

    host = os.environ.get(NODE_IPS, "").split()[int(os.environ.get("SKYPILOT_NODE_RANK", "0"))]
    agent = Agent(run.dir, host, nproc)
    stop_on_signals(agent)
    agent.start(command, dict(os.environ))
    code = agent.run_to_end(agent.watch(sky.notice_provider, sky.metadata_url, 5.0))
    if agent.notice is None:
        return code
    print(f"launcher (SkyPilot node): saved on a spot notice; waiting up to {sky.notice_hold_s} s for the VM to go",
          flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the VM shutting down (or a cancel) ends the wait at once
    time.sleep(sky.notice_hold_s)
    return 75


if __name__ == "__main__":
    sys.exit(main())
