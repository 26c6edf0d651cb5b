"""Issue 7 (points 2, 10, 11, and the Slurm half of 4), tier 1: no Slurm needed.

- The submitit batch script, rendered by submitit itself from our parameters, with hostile values in
  every string a cluster config or run name can reach: `bash -n`, sbatch's own reading of the header,
  then executed with `srun` and `python` stubbed so nothing of ours runs: no marker file appears.
- Values that must be refused are refused by `check` (before a run directory exists) on both paths.
- Secret `slurm.env` entries (secret-looking keys, values with URL user info or `?token=`) never appear
  in either script; `rank_main` sets them in the ranks.
- Both scripts hand their batch step to the supervisor (tests/test_slurm_supervise.py); `after_srun`
  counts the crash of any rank once.
- Data-loader workers and wandb's service survive the signals a job gets.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from jobs.environments import slurm as slurm_env
from launcher.backends import slurm
from jobs.schema import load_cluster, load_recipe
from jobs.schema.errors import ConfigError, UsageError
from jobs.schema.run_dir import Run
from launcher.runs import prepare_run
from launcher.sbatch import render_sbatch
from test_sbatch import HOSTILE_ENV, option_values, write_cluster

DUMP = """\
#!{python}
# records how it was called, never runs anything
import json, os, sys
keys = {keys!r}
with open({out!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def stub(path: Path, out: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DUMP.format(python=sys.executable, keys=keys, out=str(out)))
    path.chmod(0o755)
    return path


def calls(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def submitit_script(cluster_path: Path, run: Run, folder: Path) -> str:
    """What `launch` would sbatch: submitit renders it from `make_executor`'s parameters."""
    recipe, cluster = load_recipe("digits"), load_cluster(str(cluster_path))
    slurm.check_cluster(recipe, cluster)
    executor = slurm.make_executor(recipe, cluster, run.name, folder)
    return executor._make_submission_file_text(executor._submitit_command_str, "test")


@pytest.fixture
def stub_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`srun` and `scontrol` stubs first on PATH (submitit refuses to start without an srun)."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir / "srun", tmp_path / "srun.jsonl", sorted(HOSTILE_ENV) + ["SETUP_SEEN", "WANDB_API_KEY"])
    stub(bin_dir / "scontrol", tmp_path / "scontrol.jsonl", [])
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


# ----------------------------------------------------------------------------- point 2: submitit path
def hostile_slurm(pwned: Path, python: Path) -> dict[str, Any]:
    return {
        "partition": f"$(touch {pwned}/PWNED_p)",
        "account": "acc\"#ount's \\back",
        "qos": f"`touch {pwned}/PWNED_q`",
        "constraint": "a100|h100&[x*2]",
        "mem_gb": 3,
        "extra_sbatch": ["--comment=`touch " + str(pwned) + "/PWNED_c` ; x 'q'", "--hold"],
        "setup": ["SETUP_SEEN=\"verbatim: $((1 + 1))\"; export SETUP_SEEN"],
        "env": {k: v.format(pwned=pwned) for k, v in HOSTILE_ENV.items()},
        "python": str(python),
    }


def test_submitit_script_quotes_every_value_and_runs_nothing(tmp_path: Path, stub_bin: Path) -> None:
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    python = stub(tmp_path / "py $(touch PWNED_e) `id`" / "python", tmp_path / "python.jsonl",
                  sorted(HOSTILE_ENV) + ["SETUP_SEEN", "WANDB_API_KEY", "SUBMITIT_EXECUTOR"])
    cfg = write_cluster(tmp_path / "hostile.yaml", hostile_slurm(pwned, python))
    name = "my run $HOME `id` 'q\" ;x"
    run = Run(name, tmp_path / "runs $(touch PWNED_d)" / name)
    folder = run.dir / "submitit" / "launch-1"
    script = submitit_script(cfg, run, folder)
    path = tmp_path / "submitit.sh"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    opts = option_values(script)  # as sbatch itself reads the header (quotes, backslashes, '#')
    assert opts["--job-name"] == name and opts["--partition"] == f"$(touch {pwned}/PWNED_p)"
    assert opts["--account"] == "acc\"#ount's \\back" and opts["--qos"] == f"`touch {pwned}/PWNED_q`"
    assert opts["--constraint"] == "a100|h100&[x*2]" and "--hold" in opts and "--requeue" in opts
    assert opts["--comment"] == f"`touch {pwned}/PWNED_c` ; x 'q'"
    assert opts["--mem"] == "3G"  # the unit `launcher sbatch` writes too
    assert opts["--output"] == f"{folder}/%j_0_log.out"

    env = {**os.environ, "SLURM_JOB_ID": "1"}
    proc = subprocess.run(["bash", str(path)], cwd=pwned, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # the batch shell becomes the supervisor (which runs srun itself): submitit's own srun line never runs
    python_calls = calls(tmp_path / "python.jsonl")
    assert [c["argv"] for c in python_calls] == [
        ["-u", "-m", "jobs.environments.slurm_supervise", "--submitit-folder", str(folder)]]
    assert python_calls[0]["env"] == {**{k: v.format(pwned=pwned) for k, v in HOSTILE_ENV.items()},
                                      "SETUP_SEEN": "verbatim: 2", "WANDB_API_KEY": os.environ.get("WANDB_API_KEY"),
                                      "SUBMITIT_EXECUTOR": "slurm"}
    assert not calls(tmp_path / "srun.jsonl")
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("slurm_cfg, key", [
    ({"env": {"X=1; touch /tmp/p; Y": "v"}}, "slurm.env.X=1; touch /tmp/p; Y"),
    ({"env": {"A": "a\ntouch /tmp/p"}}, "slurm.env.A"),
    ({"partition": "a\ntouch /tmp/p"}, "slurm.partition"),
    ({"account": "a\ntouch /tmp/p"}, "slurm.account"),
    ({"qos": "a\rb"}, "slurm.qos"),
    ({"constraint": "a\ntouch /tmp/p"}, "slurm.constraint"),
    ({"extra_sbatch": ["--comment=a\ntouch /tmp/p"]}, "slurm.extra_sbatch[0]"),
    ({"extra_sbatch": ["--x\ntouch /tmp/p"]}, "slurm.extra_sbatch[0]"),
    ({"extra_sbatch": ["-C gpu"]}, "slurm.extra_sbatch[0]"),
    ({"setup": ["module load a\ntouch /tmp/p"]}, "slurm.setup[0]"),
    ({"python": "/usr/bin/python3\ntouch /tmp/p"}, "slurm.python"),
])
def test_check_refuses_unsafe_values_for_both_paths(tmp_path: Path, slurm_cfg: dict, key: str) -> None:
    cluster = load_cluster(str(write_cluster(tmp_path / "bad.yaml", {"partition": "debug", **slurm_cfg})))
    recipe = load_recipe("digits")
    with pytest.raises(ConfigError) as err:
        slurm.check(recipe, cluster)  # what `launch` and sweeps call before making a run directory
    assert err.value.key == key and str(err.value).startswith(f"cluster config bad: {key}: ")
    with pytest.raises(ConfigError) as err:
        render_sbatch(recipe, cluster, Run("r", tmp_path / "r"), cluster.slurm.python or "/usr/bin/python3")
    assert err.value.key == key


def test_launch_refuses_with_exit_2_before_anything_is_written(tmp_path: Path, runs_dir: Path) -> None:
    cfg = write_cluster(tmp_path / "inj.yaml", {"partition": "debug", "env": {"X=1; touch PWNED; Y": "v"}})
    proc = run_cli("launch", "digits", "--cluster", str(cfg), "--run-name", "inj", runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: cluster config inj: slurm.env.X=1; touch PWNED; Y: ")
    assert "Traceback" not in proc.stderr and not list(runs_dir.iterdir())


def test_run_directory_that_sbatch_would_expand_is_refused(tmp_path: Path, stub_bin: Path) -> None:
    cfg = write_cluster(tmp_path / "c.yaml", {"partition": "debug"})
    with pytest.raises(UsageError, match="contains '%'"):
        submitit_script(cfg, Run("r", tmp_path / "a%jb"), tmp_path / "a%jb" / "submitit")


# ----------------------------------------------------------------------------- secrets (point 4, Slurm half)
SECRETS = {"WANDB_API_KEY": "sekr1t-wandb", "HF_TOKEN": "sekr1t-hf", "AWS_SECRET_ACCESS_KEY": "sekr1t-aws",
           # secret values under plain names (issue 23): URL user info, a ?token= query value
           "HF_ENDPOINT": "https://alice:sekr1t-url@hub.example/x", "DATA_URL": "https://d.example/x?token=sekr1t-q"}


def test_secret_env_never_written_into_either_script(tmp_path: Path, stub_bin: Path) -> None:
    cfg = write_cluster(tmp_path / "s.yaml", {"partition": "debug", "env": {**SECRETS, "PLAIN_VALUE": "visible"}})
    run = Run("s", tmp_path / "s")
    scripts = [submitit_script(cfg, run, run.dir / "submitit"),
               render_sbatch(load_recipe("digits"), load_cluster(str(cfg)), run, "/usr/bin/python3")]
    for script in scripts:
        assert "export PLAIN_VALUE=visible" in script
        assert not [v for v in SECRETS.values() if v in script], script


def test_rank_main_sets_every_slurm_env_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks still get the secret values the scripts leave out: rank_main sets them itself."""
    import jobs.train

    cfg = write_cluster(tmp_path / "s.yaml", {"partition": "debug", "env": {**SECRETS, "PLAIN_VALUE": "visible"}})
    run = prepare_run(load_recipe("digits"), load_cluster(str(cfg)), "s", tmp_path / "runs", "auto")
    seen: dict[str, str] = {}
    monkeypatch.setattr(jobs.train, "run_training", lambda run_dir, force_resume: seen.update(os.environ) or {})
    monkeypatch.setattr(jobs.train, "exit_cleanly", lambda: None)
    for key in [*SECRETS, "PLAIN_VALUE"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    try:
        slurm_env.rank_main(str(run.dir))
        assert {k: seen.get(k) for k in [*SECRETS, "PLAIN_VALUE"]} == {**SECRETS, "PLAIN_VALUE": "visible"}
    finally:
        for key in [*SECRETS, "PLAIN_VALUE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                    "MASTER_ADDR", "MASTER_PORT"]:
            os.environ.pop(key, None)


# ----------------------------------------------------------------------------- point 10: any rank's crash counts
def _crashed_run(tmp_path: Path, max_failures: int) -> Run:
    cfg = write_cluster(tmp_path / "c.yaml", {"partition": "debug", "max_failures": max_failures})
    return prepare_run(load_recipe("digits"), load_cluster(str(cfg)), "c", tmp_path / "runs", "auto")


def test_after_srun_counts_the_first_failing_rank_then_stops(tmp_path: Path, stub_bin: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = _crashed_run(tmp_path, max_failures=1)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    for restart in (0, 1):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        run.update(state="terminated")  # what rank 0 records when srun's kill reached it as SIGTERM
        slurm_env.record_failure(run, 1, "Traceback ...\nRuntimeError: boom on rank 1\n")
        time.sleep(0.01)
        slurm_env.record_failure(run, 0, "Traceback ...\nRuntimeError: Connection closed by peer\n")
        slurm_env.after_srun(run)
        info = run.info()
        assert info.requeues == {"failures": 1}, info
        assert info.last_requeue == "rank 1: RuntimeError: boom on rank 1"
    assert info.state == "stopped" and "failures limit of 1 reached" in info.stop_reason
    assert "rank 1: RuntimeError: boom on rank 1" in info.stop_reason
    requeues = [c["argv"] for c in calls(tmp_path / "scontrol.jsonl") if c["argv"][0] == "requeue"]
    assert requeues == [["requeue", "7"]]  # requeued once


@pytest.mark.parametrize("state, crash", [("RUNNING", True), ("REQUEUED", False), ("CANCELLED", False),
                                          ("TIMEOUT", False), ("NODE_FAIL", False)])
def test_after_srun_counts_no_crash_when_slurm_itself_ends_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   state: str, crash: bool) -> None:
    """An admin's `scontrol requeue` (or scancel) TERMs the ranks and the batch shell; under load srun
    can exit of it before the shell's TERM arrives. Slurm's own view of the job tells the two apart: a
    job a rank crashed in is still RUNNING."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/scontrol.log\n'
                                      f'[ "$1" = show ] && echo "JobId=9 JobName=x JobState={state} Reason=None"\n'
                                      "exit 0\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    run = _crashed_run(tmp_path, max_failures=3)
    run.update(state="terminated")  # rank 0 took the SIGTERM for a stop
    slurm_env.after_srun(run)
    info = run.info()
    said = (tmp_path / "scontrol.log").read_text().splitlines()
    assert said[0] == "show job -o 9", said
    assert (info.requeues == {"failures": 1} and info.state == "requeued" and "requeue 9" in said) is crash, (info, said)
    if not crash:
        assert info.requeues == {} and info.state == "terminated" and len(said) == 1, (info, said)


def test_after_srun_leaves_a_decided_run_alone(tmp_path: Path, stub_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _crashed_run(tmp_path, max_failures=5)
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    slurm_env.record_failure(run, 1, "RuntimeError: late\n")
    run.update(state="requeued", requeues={"preemptions": 1})  # rank 0 already requeued after a preemption
    slurm_env.after_srun(run)
    assert run.info().requeues == {"preemptions": 1} and not calls(tmp_path / "scontrol.jsonl")


def test_after_srun_finds_the_run_of_a_job_array_element(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's teardown only knows its folder: the element's pickle names the run (sweeps)."""
    from submitit.core.utils import DelayedSubmission

    DelayedSubmission(slurm_env.rank_main, "/runs/trial-2").dump(tmp_path / "12_2_submitted.pkl")
    for key, value in {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "2"}.items():
        monkeypatch.setenv(key, value)
    assert slurm_env.submitted_run_dir(tmp_path) == "/runs/trial-2"


def test_plain_script_hands_its_step_to_the_supervisor(tmp_path: Path, stub_bin: Path) -> None:
    """`launcher sbatch`'s script: the setup runs, then the shell becomes the supervisor, which forwards
    notices (the script's --signal=B:USR2 reaches the batch shell only)."""
    python = stub(tmp_path / "python", tmp_path / "python.jsonl", [])
    run = Run("p", tmp_path / "p")
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(load_recipe("digits"), load_cluster("local_slurm"), run, str(python)))
    proc = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_JOB_ID": "1", "STUB_EXIT": "3"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr  # the supervisor's status is the job's
    assert [c["argv"] for c in calls(tmp_path / "python.jsonl")] == [
        ["-u", "-m", "jobs.environments.slurm_supervise", "--run-dir", str(run.dir), "--forward-notices"]]


# ----------------------------------------------------------------------------- point 11: helpers survive signals
def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


@pytest.mark.slow  # real worker processes and signals
def test_loader_workers_outlive_the_jobs_signals() -> None:
    """Slurm signals every process of a step; a worker dying of USR2/TERM would fail the rank."""
    import torch
    from torch.utils.data import TensorDataset

    from jobs.training.step import micro_batches

    data = TensorDataset(torch.arange(2000.0).view(-1, 1), torch.zeros(2000, dtype=torch.long))
    batches = micro_batches(data, list(range(2000)), 0, 1000, 2, 1, workers=1)  # type: ignore[arg-type]
    next(batches)
    workers = _descendants(os.getpid())
    assert workers
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            for pid in workers:
                os.kill(pid, sig)
            time.sleep(0.2)
        assert sum(1 for _ in batches) == 999
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


TRACKER_UNDER_SIGNAL = """\
import json, os, signal, sys, time
from pathlib import Path
from jobs.tracking import MetricsLogger
from jobs.schema import LoggingConfig
from test_slurm_scripts import _descendants

sig, out = signal.Signals(int(sys.argv[1])), Path(sys.argv[2])
metrics = MetricsLogger(LoggingConfig(tracker="wandb", project="t"), out, "r", "sigtest", {}, True)
metrics.log(1, {"loss": 1.0})
service = [p for p in _descendants(os.getpid()) if Path(f"/proc/{p}/comm").read_text().strip() == "wandb-core"]
signal.signal(sig, lambda *_: None)  # the rank's own handler: a stop request
os.kill(service[0], sig)
time.sleep(1)
metrics.log(2, {"loss": 0.5})
metrics.close()
print(json.dumps({"tracker_kept": metrics._wandb is not None}))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR2, signal.SIGTERM])
@pytest.mark.slow  # real worker processes and signals
def test_tracker_survives_a_signal_to_wandbs_service(sig: signal.Signals, tmp_path: Path) -> None:
    """USR2: wandb-core lives on. INT/TERM: wandb-core exits (it catches them itself, so no inherited
    disposition helps), and losing the tracker does not fail the rank; metrics.jsonl keeps everything.
    A process per case: wandb keeps one service per process."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TRACKER_UNDER_SIGNAL, str(int(sig)), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads(proc.stdout.splitlines()[-1])["tracker_kept"] == (sig == signal.SIGUSR2), proc.stderr[-3000:]
