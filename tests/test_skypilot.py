"""`launcher skypilot`: SkyPilot task files.

Tier 1: golden files (regenerate with UPDATE_GOLDEN=1), SkyPilot's own task parser (from a venv that has
SkyPilot: SKYPILOT_PYTHON, or /tmp/skyvenv made by scripts/skypilot_venv.sh; skipped where pip cannot install it), the rendered `run` command executed by
bash with hostile values, the SkyPilot -> torchrun table, and refusals (exit 2, one line, nothing written).
Tier 2 (slow): the `run` command of a 2-node task run by bash as two "nodes" on this machine, each with
its own home (no run directory shared), stopped by a GCE spot notice (the ranks save, the nodes wait for their
VMs to go instead of telling SkyPilot the job succeeded) and recovered on a surviving head and a fresh "VM" with the same
SKYPILOT_TASK_ID: it resumes from checkpoint.uri and ends bit-equal to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, final_params, read_result, run_cli, wait_until
from metadata_server import MetadataServer
from jobs.environments import skypilot as node
from launcher.skypilot import render_task
from jobs.schema import load_cluster, load_recipe

GOLDEN = Path(__file__).resolve().parent / "golden" / "skypilot"
GOLDEN_CASES = {  # name -> (cluster config, recipe overrides)
    "aws_single": ("skypilot_aws", ["parallel.procs_per_node=1", "checkpoint.uri=s3://my-bucket/checkpoints"]),
    "gcp_spot_2nodes": ("skypilot_gcp", ["parallel.nodes=2", "parallel.procs_per_node=8", "trainer.global_batch=512",
                                         "checkpoint.uri=gs://my-bucket/checkpoints"]),
}
HOSTILE = "it's a \"$HOME\" $(touch PWNED) `id` & ; | * ~ \\ x"


def golden_text(text: str) -> str:
    """The task file with its encoded configs replaced by a placeholder: a field added to any config section
    changes them, and test_golden_task_carries_the_run_and_no_secret checks what they decode to."""
    lines = [f"  {node.RUN_VARIABLE}: <gzip+base64 JSON of the resolved configs>"
             if line.startswith(f"  {node.RUN_VARIABLE}: ") else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def rendered(cluster_name: str, overrides: list[str], **sky: object) -> str:
    cluster = load_cluster(cluster_name)
    cluster = dataclasses.replace(cluster, skypilot=dataclasses.replace(cluster.skypilot, **sky))
    return render_task(load_recipe("digits", overrides), cluster, "digits-golden")


def write_cluster(path: Path, skypilot: dict, **top: object) -> Path:
    path.write_text(yaml.safe_dump({"skypilot": skypilot, **top}))
    return path


def sky_python() -> str | None:
    """An interpreter that can import SkyPilot: this one, SKYPILOT_PYTHON, or the throwaway /tmp/skyvenv
    (SkyPilot pulls in ~50 packages, so it is not a dependency of the project's own environment)."""
    for candidate in (os.environ.get("SKYPILOT_PYTHON"), sys.executable, "/tmp/skyvenv/bin/python"):
        if candidate and Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import sky"], capture_output=True, timeout=60).returncode == 0:
            return candidate
    # none yet: make the throwaway one (~35 s once per machine, like sshd and Slurm for their tests)
    made = subprocess.run(["bash", str(REPO / "scripts" / "skypilot_venv.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    return made.stdout.strip().splitlines()[-1] if made.returncode == 0 and made.stdout.strip() else None


# ----------------------------------------------------------------------------- tier 1: golden files
@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_render_matches_golden(case: str) -> None:
    cluster_name, overrides = GOLDEN_CASES[case]
    text = golden_text(rendered(cluster_name, overrides, workdir="/src/project"))  # not this checkout's path
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text(), f"{golden} differs: review, then UPDATE_GOLDEN=1 to accept"


def test_golden_task_carries_the_run_and_no_secret() -> None:
    """What the golden file must mean, not only say: the nodes' configs decode to the recipe, and the
    secret-looking env key is declared for --secret with no value anywhere in the file."""
    text = rendered("skypilot_gcp", GOLDEN_CASES["gcp_spot_2nodes"][1],
                    env={"NCCL_DEBUG": "WARN", "WANDB_API_KEY": "sekrit-value-123"})
    task = yaml.safe_load(text)
    assert "sekrit-value-123" not in text and task["secrets"] == {"WANDB_API_KEY": None}
    assert "WANDB_API_KEY" not in task["envs"] and task["envs"]["NCCL_DEBUG"] == "WARN"
    recipe, cluster = node.decode_configs(task["envs"][node.RUN_VARIABLE])
    assert (recipe.parallel.nodes, recipe.parallel.procs_per_node) == (2, 8) == (task["num_nodes"], 8)
    assert recipe.checkpoint.uri == "gs://my-bucket/checkpoints" and cluster.name == "skypilot_gcp"
    assert cluster.skypilot.env["WANDB_API_KEY"] == "***"  # masked inside the encoded configs too
    assert task["resources"]["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 2}


@pytest.mark.slow  # importing SkyPilot takes seconds
def test_skypilot_parses_the_task(tmp_path: Path) -> None:
    python = sky_python()
    if python is None:
        pytest.skip("SkyPilot is not installed here (pip install skypilot into a venv; SKYPILOT_PYTHON=its python)")
    path = tmp_path / "task.yaml"
    path.write_text(rendered("skypilot_gcp", GOLDEN_CASES["gcp_spot_2nodes"][1]))
    check = ("import json, sys, sky\n"
             "t = sky.Task.from_yaml_config(__import__('yaml').safe_load(open(sys.argv[1])),\n"
             "                              secrets_overrides=[('WANDB_API_KEY', 'x')])\n"
             "r = list(t.resources)[0]\n"
             "print(json.dumps({'nodes': t.num_nodes, 'spot': r.use_spot, 'recovery': r.job_recovery,\n"
             "                  'gpus': r.accelerators, 'cloud': str(r.cloud), 'envs': sorted(t.envs),\n"
             "                  'secrets': sorted(t.secrets)}))\n")
    proc = subprocess.run([python, "-c", check, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})  # SkyPilot writes ~/.sky
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"nodes": 2, "spot": True, "recovery": {"strategy": "EAGER_NEXT_REGION",
                                                           "max_restarts_on_errors": 2},
                    "gpus": {"A100": 8}, "cloud": "GCP", "envs": [node.RUN_VARIABLE, "NCCL_DEBUG"],
                    "secrets": ["WANDB_API_KEY"]}


# ----------------------------------------------------------------------------- tier 1: quoting
def test_hostile_values_reach_the_node_as_written(tmp_path: Path) -> None:
    """The rendered run command, executed by bash: a python and folders full of quotes, $, backticks and
    spaces arrive as written (a fake python records its argv and directory), and nothing is executed."""
    home = tmp_path / "home"
    project = home / f"proj {HOSTILE}"  # given as ~/...: must still mean the node's home
    (project / "bin").mkdir(parents=True)
    fake = project / "bin" / f"py {HOSTILE}"
    fake.write_text('#!/bin/sh\n{ pwd; for a in "$@"; do printf "%s\\n" "$a"; done; } > "$HOME/argv"\n')
    fake.chmod(0o755)
    text = rendered("skypilot_aws", ["parallel.procs_per_node=1"], python=str(fake),
                    project_dir=f"~/proj {HOSTILE}", runs_dir=f"~/runs {HOSTILE}",
                    env={"OMP_NUM_THREADS": "4", "NOTE": HOSTILE}, setup=(f"echo {HOSTILE!r}",))
    task = yaml.safe_load(text)
    assert task["envs"]["NOTE"] == HOSTILE and task["setup"] == f"echo {HOSTILE!r}\n"  # YAML round trip
    proc = subprocess.run(["bash", "-c", task["run"]], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert (home / "argv").read_text().splitlines() == [
        str(project), "-m", node.ENTRY_MODULE, "--run-name", "digits-golden", "--runs-dir", f"~/runs {HOSTILE}",
        "--nproc-per-node", "1", "--master-port", "29500"]
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("value", ["a\nb", "a\rb"])
def test_a_line_break_in_a_value_is_refused_and_nothing_written(tmp_path: Path, value: str) -> None:
    for section in ({"setup": [f"echo {value}"]}, {"env": {"X": value}}, {"python": value}):
        cluster = write_cluster(tmp_path / "c.yaml", section)
        out = tmp_path / "task.yaml"
        proc = run_cli("skypilot", "digits", "parallel.procs_per_node=1", "--cluster", str(cluster), "--out", str(out))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
        assert "control character" in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------- tier 1: refusals
REFUSALS = {  # what is wrong -> (cluster config, overrides, the words the one line must say)
    "no section": ({"runs_dir": "runs"}, [], "no skypilot: section"),
    "2 nodes, no checkpoint.uri": ({"skypilot": {}}, ["parallel.nodes=2"], "checkpoint.uri"),
    "GPUs != ranks": ({"skypilot": {"accelerators": "A100:8"}}, [], "gives 8 GPUs per node"),
    "bad accelerators": ({"skypilot": {"accelerators": "A100:x"}}, [], "skypilot.accelerators"),
    "bad recovery": ({"skypilot": {"job_recovery": "EAGER"}}, [], "skypilot.job_recovery"),
    "secret in storage": ({"skypilot": {}, "storage": {"endpoint_url": "http://me:hunter2@127.0.0.1:9"}}, [],
                          "storage.endpoint_url: holds a credential"),
    "reserved env": ({"skypilot": {"env": {"SKYPILOT_NODE_RANK": "3"}}}, [], "skypilot.env.SKYPILOT_NODE_RANK"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    config, overrides, words = REFUSALS[case]
    cluster, out = tmp_path / "c.yaml", tmp_path / "task.yaml"
    cluster.write_text(yaml.safe_dump(config))
    proc = run_cli("skypilot", "digits", "parallel.procs_per_node=1", *overrides, "--cluster", str(cluster),
                   "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and words in lines[0] and len(lines) <= 2, proc.stderr
    assert not out.exists() and proc.stdout == "" and "hunter2" not in proc.stderr


@pytest.mark.parametrize("target", ["fifo", "folder", ""])
def test_out_that_is_not_a_file_is_refused_alone(tmp_path: Path, target: str) -> None:
    """A FIFO blocked the write forever (no reader); a folder's refusal came after the no-checkpoint warning."""
    cluster = write_cluster(tmp_path / "c.yaml", {})
    out = tmp_path / target if target else Path("")
    if target == "fifo":
        os.mkfifo(out)
    elif target:
        out.mkdir()
    proc = run_cli("skypilot", "digits", "parallel.procs_per_node=1", "--cluster", str(cluster), "--out",
                   str(out) if target else "", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[0].startswith("error: --out ") and len(lines) == 2, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.yaml", *([target] if target else [])])


# ----------------------------------------------------------------------------- tier 1: the node's side
ENV = {"SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.9\n", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2",
       "SKYPILOT_NUM_GPUS_PER_NODE": "8"}


def test_skypilot_variables_map_to_torchrun_options() -> None:
    assert node.torchrun_options(ENV, nodes=2, nproc=8, port=29500) == [
        "--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--master-addr=10.0.0.7", "--master-port=29500"]


@pytest.mark.parametrize("change, words", [({"SKYPILOT_NUM_NODES": "3"}, "3 nodes"),
                                           ({"SKYPILOT_NUM_GPUS_PER_NODE": "4"}, "4 GPUs"),
                                           ({"SKYPILOT_NODE_IPS": ""}, "SKYPILOT_NODE_IPS is not set")])
def test_a_node_that_does_not_fit_the_recipe_is_refused(change: dict, words: str) -> None:
    with pytest.raises(node.NodeError, match=words):
        node.torchrun_options({**ENV, **change}, nodes=2, nproc=8, port=29500)


def test_a_damaged_config_variable_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", node.ENTRY_MODULE, "--run-name", "r", "--runs-dir", str(tmp_path),
                           "--nproc-per-node", "1", "--master-port", "29500"], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **ENV, node.RUN_VARIABLE: "H4sI-not-base64",
                                                     node.TASK_ID: "t"})
    assert proc.returncode == 2 and "LAUNCHER_RUN cannot be read" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_run_is_keyed_by_the_task_id() -> None:
    """Recoveries of one managed job keep SKYPILOT_TASK_ID: same run and id; another job: another run."""
    first = "sky-managed-2025-01-01-00-00-00-000001_train_7"
    assert node.run_name("r", first) == node.run_name("r", first) != node.run_name("r", first[:-1] + "8")
    assert node.run_id(first) != node.run_id(first[:-1] + "8")


# ----------------------------------------------------------------------------- tier 2: a real run
RUN_OVERRIDES = ["parallel.nodes=2", "parallel.procs_per_node=1", "trainer.epochs=6", "checkpoint.every_steps=10",
                 "logging.log_every=1", "logging.progress_bar=false"]


def start_nodes(task: dict, homes: list[Path], task_id: str) -> list[subprocess.Popen]:
    """The task's `run` command on every "node", with the variables SkyPilot sets (and its envs)."""
    procs = []
    for rank, home in enumerate(homes):
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "OMP_NUM_THREADS": "1", **task["envs"],
               "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1", "SKYPILOT_NODE_RANK": str(rank),
               "SKYPILOT_NUM_NODES": str(len(homes)), "SKYPILOT_NUM_GPUS_PER_NODE": "0", "SKYPILOT_TASK_ID": task_id}
        log = open(home / "node.log", "w")
        procs.append(subprocess.Popen(["bash", "-c", task["run"]], cwd=home, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], homes: list[Path]) -> list[int]:
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * len(codes), "\n".join((h / "node.log").read_text()[-3000:] for h in homes)
    return codes


def run_dir(home: Path) -> Path:
    found = list((home / "sky_runs").iterdir())
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_a_recovered_task_resumes_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    uri = tmp_path / "bucket"
    metadata = MetadataServer().start()  # GCE's metadata service, as every spot VM of the task sees it
    cluster = write_cluster(tmp_path / "sky.yaml", {"python": sys.executable, "project_dir": str(REPO),
                                                    "cloud": "gcp", "use_spot": True, "metadata_url": metadata.url})
    out = tmp_path / "task.yaml"
    run_cli("skypilot", "digits", *RUN_OVERRIDES, f"checkpoint.uri=file://{uri}", "--cluster", str(cluster),
            "--run-name", "sky", "--out", str(out), check=True)
    task = yaml.safe_load(out.read_text())

    straight = [tmp_path / "a" / f"node{i}" for i in (0, 1)]
    finish(start_nodes(task, straight, "task-straight"), straight)
    assert read_result(run_dir(straight[0]))["outcome"] == "completed"

    cut = [tmp_path / "b" / f"node{i}" for i in (0, 1)]
    procs = start_nodes(task, cut, "task-cut")
    name = node.run_name("sky", "task-cut")
    wait_until(lambda: list((uri / name).glob("step-*/manifest.json")), "the first committed checkpoint", poll=0.02)
    metadata.notice()  # a preemption notice: the ranks save together, then the nodes wait for the VMs to go
    stopped = wait_until(lambda: (run_dir(cut[0]) / "result.json").exists() and read_result(run_dir(cut[0])),
                         "the ranks to save on the notice")
    assert stopped["outcome"] == "preempted" and stopped["signal"] == "SIGUSR1", stopped
    assert stopped["checkpoints_committed"], stopped
    wait_until(lambda: "waiting up to" in (cut[0] / "node.log").read_text(), "node 0 to wait for its VM to go")
    assert all(p.poll() is None for p in procs)  # exiting 0 would tell SkyPilot the job succeeded
    for proc in procs:  # the VMs are taken away
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    metadata.stop()  # the replacement VMs' metadata has no notice
    metadata = MetadataServer(port=int(metadata.url.rsplit(":", 1)[1])).start()

    # The head VM survived with its disk (its local copy of the checkpoint), node 1 is a replacement VM with an
    # empty one, same task id. Rank 0 must resume from checkpoint.uri all the same: the location it picks is
    # the one every rank loads, and node 1 cannot read node 0's folder.
    recovered = [cut[0], tmp_path / "c" / "node1"]
    assert (run_dir(cut[0]) / "checkpoints" / f"step-{stopped['step']:09d}").exists()
    finish(start_nodes(task, recovered, "task-cut"), recovered)
    assert run_dir(recovered[1]).name == name
    log = (run_dir(recovered[0]) / "logs" / "rank0.log").read_text()  # rank 1 logs no "resumed": its data
    assert f"resumed from file://{uri}/{name}/step-{stopped['step']:09d}" in log, log[-2000:]  # shows in the weights
    assert read_result(run_dir(recovered[0]))["outcome"] == "completed"
    metadata.stop()
    expected, got = final_params(run_dir(straight[0])), final_params(run_dir(recovered[0]))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


def test_an_fsdp_task_on_several_nodes_saves_through_the_store() -> None:
    """FSDP across SkyPilot nodes: the task is written, and its nodes share no folder, so each rank sends its
    own shard to checkpoint.uri (jobs/checkpoint/spread.py, chosen by the trainer from the cluster config)."""
    text = rendered("skypilot_gcp", ["parallel.nodes=2", "parallel.procs_per_node=8", "parallel.strategy=fsdp",
                                     "trainer.micro_batch=4", "checkpoint.uri=gs://my-bucket/checkpoints"])
    recipe, cluster = node.decode_configs(yaml.safe_load(text)["envs"][node.RUN_VARIABLE])
    assert recipe.parallel.strategy == "fsdp" and recipe.parallel.nodes == 2
    assert not cluster.nodes_share_run_dir  # what makes the trainer's checkpointer send each rank's shard
