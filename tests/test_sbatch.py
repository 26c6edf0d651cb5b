"""`launcher sbatch`: golden scripts, quoting against injection, the signal trap, and real Slurm.

Tier 1 (pure, no Slurm): rendering against tests/golden/*.sbatch (regenerate with UPDATE_GOLDEN=1),
hostile config values executed through the real script with a fake `srun`, and the trap/wait loop.
Tier 2 (`-m slurm`, in test_sbatch_slurm.py): the script submitted to the local Slurm.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from jobs.schema import load_cluster, load_recipe
from jobs.schema.errors import ConfigError
from jobs.schema.run_dir import Run
from launcher.sbatch import render_sbatch
from launcher.runs import prepare_run

GOLDEN = Path(__file__).resolve().parent / "golden"
PYTHON = "/usr/bin/python3"
GOLDEN_CASES = {
    "local_slurm": ("digits", []),
    "gpu_cluster": ("digits", ["parallel.nodes=2", "parallel.procs_per_node=8", "trainer.global_batch=512"]),
}


# ----------------------------------------------------------------------------- helpers
def sbatch_arguments(script: str) -> list[str]:
    """The options sbatch reads from the #SBATCH lines, tokenised as Slurm's `_get_argument`
    (src/sbatch/opt.c) does: whitespace splits, quotes group, backslash escapes, `#` ends the line.
    The real-Slurm test below checks the same values against sbatch itself."""
    args: list[str] = []
    for line in script.splitlines()[1:]:
        if not line.strip():
            continue
        if not line.startswith("#"):
            break  # sbatch stops reading options at the first command
        if not line.startswith("#SBATCH"):
            continue
        rest, i, current, quote, have = line[len("#SBATCH"):], 0, "", "", False
        while i < len(rest):
            ch = rest[i]
            if ch == "\\" and i + 1 < len(rest):
                current, have, i = current + rest[i + 1], True, i + 2
                continue
            if quote:
                if ch == quote:
                    quote = ""
                else:
                    current += ch
            elif ch in "\"'":
                quote, have = ch, True
            elif ch == "#":
                break
            elif ch.isspace():
                if have:
                    args.append(current)
                current, have = "", False
            else:
                current, have = current + ch, True
            i += 1
        assert not quote, f"unmatched quote in {line!r}"
        if have:
            args.append(current)
    return args


def option_values(script: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for arg in sbatch_arguments(script):
        key, eq, value = arg.partition("=")
        out[key] = value if eq else None
    return out


def write_cluster(path: Path, slurm: dict) -> Path:
    path.write_text(yaml.safe_dump({"backend": "slurm", "runs_dir": str(path.parent / "runs"), "slurm": slurm}))
    return path


def fake_srun(bin_dir: Path, body: str) -> None:
    """A Python `srun` earlier on PATH: the script runs for real, the ranks do not."""
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    srun.chmod(0o755)


def render(cluster_name: str, run: Run, overrides: list[str] = ()) -> str:
    return render_sbatch(load_recipe("digits", list(overrides)), load_cluster(cluster_name), run, PYTHON)


# ----------------------------------------------------------------------------- tier 1: golden files
@pytest.mark.parametrize("cluster_name", list(GOLDEN_CASES))
def test_render_matches_golden(cluster_name: str) -> None:
    recipe_name, overrides = GOLDEN_CASES[cluster_name]
    recipe = load_recipe(recipe_name, overrides)
    cluster = load_cluster(cluster_name)
    cluster.check_recipe(recipe, cluster_name)
    run = Run(f"{recipe_name}-golden", Path(f"/runs/{recipe_name}-golden"))
    script = render_sbatch(recipe, cluster, run, PYTHON)
    golden = GOLDEN / f"{cluster_name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 to create it"
    assert script == golden.read_text(), f"{golden} differs: review, then UPDATE_GOLDEN=1 to accept"


RENDER_IN_A_FRESH_PROCESS = """\
import json, sys
from pathlib import Path
from jobs.schema.run_dir import Run
from launcher.sbatch import render_sbatch
from jobs.schema import load_cluster, load_recipe
scripts = {}
for cluster_name, (recipe_name, overrides) in json.loads(sys.argv[1]).items():
    run = Run(f"{recipe_name}-golden", Path(f"/runs/{recipe_name}-golden"))
    scripts[cluster_name] = render_sbatch(load_recipe(recipe_name, overrides), load_cluster(cluster_name), run,
                                          "/usr/bin/python3")
print(json.dumps({"scripts": scripts, "hash": hash("which seed")}))
"""


def test_render_is_byte_identical_in_any_process(tmp_path: Path) -> None:
    """Five fresh processes that differ in everything that could leak into a script: the hash seed
    (set and dict-of-set order), the working directory, the environment's order and content (Slurm
    and locale variables, HOME, TZ). Every script matches its golden file byte for byte."""
    repo = Path(__file__).resolve().parent.parent
    noise = {"SLURM_JOB_ID": "99", "SBATCH_PARTITION": "other", "SLURM_CPUS_PER_TASK": "7", "LC_ALL": "C",
             "TZ": "Asia/Kolkata", "HOME": str(tmp_path), "LAUNCHER_CLUSTER": "gpu_cluster"}
    seeds = []
    for i, seed in enumerate(["0", "1", "2", "4242", "random"]):
        env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONHASHSEED": seed, **(noise if i % 2 else {})}
        env = dict(reversed(env.items())) if i % 2 else dict(sorted(env.items()))
        cwd = tmp_path / f"cwd{i}" if i else repo
        cwd.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-c", RENDER_IN_A_FRESH_PROCESS, json.dumps(GOLDEN_CASES)], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        for cluster_name, script in out["scripts"].items():
            assert script.encode() == (GOLDEN / f"{cluster_name}.sbatch").read_bytes(), (cluster_name, seed)
        seeds.append(out["hash"])
    assert len(set(seeds)) == len(seeds)  # the hash seeds took effect: each process ordered sets its own way


def test_golden_scripts_are_valid_and_complete() -> None:
    for cluster_name, (_, overrides) in GOLDEN_CASES.items():
        script = (GOLDEN / f"{cluster_name}.sbatch").read_text()
        check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        opts = option_values(script)
        # every #SBATCH line sits before the first command, or sbatch would silently ignore it
        assert script.count("#SBATCH") == len(sbatch_arguments(script)), cluster_name
        assert opts["--signal"].startswith("B:USR2@") and "--requeue" in opts
        assert opts["--output"] == "/runs/digits-golden/slurm-%j.out" and opts["--open-mode"] == "append"
        assert script.endswith("exec /usr/bin/python3 -u -m jobs.environments.slurm_supervise "
                               "--run-dir /runs/digits-golden --forward-notices\n")
    gpu = option_values((GOLDEN / "gpu_cluster.sbatch").read_text())
    assert gpu["--nodes"] == "2" and gpu["--ntasks-per-node"] == "8" and gpu["--gpus-per-node"] == "8"
    assert gpu["--constraint"] == "a100|h100" and gpu["--reservation"] == "training" and "--exclusive" in gpu
    assert gpu["--mem"] == "480G" and gpu["--signal"] == "B:USR2@180" and gpu["--time"] == "1440"
    local = option_values((GOLDEN / "local_slurm.sbatch").read_text())
    assert "--gpus-per-node" not in local and "--account" not in local and local["--ntasks-per-node"] == "2"


# ----------------------------------------------------------------------------- tier 1: hostile values
HOSTILE_ENV = {
    "X_SUBST": "$(touch {pwned}/PWNED_x)",
    "X_BACKTICK": "`touch {pwned}/PWNED_y`",
    "X_QUOTES": "a'b\"c",
    "X_SEMICOLON": "; touch {pwned}/PWNED_z; echo",
    "X_MIXED": "$HOME ${{HOME}} \\ \\n * ? ~ # && || > /dev/null",
    "X_EMPTY": "",
    "X_UNICODE": "héllo ✓",
}


def hostile_cluster(tmp_path: Path, pwned: Path) -> Path:
    return write_cluster(tmp_path / "hostile.yaml", {
        "partition": f"$(touch {pwned}/PWNED_p)",
        "account": "acc\"#ount's",
        "constraint": "a100|h100&[x*2]",
        "extra_sbatch": ["--comment=`touch " + str(pwned) + "/PWNED_c` ; x", "--hold"],
        "setup": ["SETUP_SEEN=\"verbatim: $((1 + 1))\"; export SETUP_SEEN"],
        "env": {k: v.format(pwned=pwned) for k, v in HOSTILE_ENV.items()},
    })


def test_hostile_values_never_execute_and_arrive_intact(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    pwned.mkdir()
    cluster = load_cluster(str(hostile_cluster(tmp_path, pwned)))
    name = "my run $HOME `id` 'q\" %j;x"
    run = Run(name, tmp_path / "runs dir $(touch PWNED_d)" / name)
    python = str(tmp_path / "py $(touch PWNED_e)" / "python")  # a fake that records how the script ran it
    script = render_sbatch(load_recipe("digits"), cluster, run, python)
    path = tmp_path / "job.sbatch"
    path.write_text(script)

    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    opts = option_values(script)  # what sbatch itself will read from the header
    assert opts["--job-name"] == name
    assert opts["--partition"] == f"$(touch {pwned}/PWNED_p)" and opts["--account"] == "acc\"#ount's"
    assert opts["--constraint"] == "a100|h100&[x*2]" and "--hold" in opts
    assert opts["--comment"] == f"`touch {pwned}/PWNED_c` ; x"
    assert opts["--output"] == str(run.dir).replace("%", "%%") + "/slurm-%j.out"

    out = tmp_path / "python.json"
    Path(python).parent.mkdir()
    Path(python).write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import json, os, sys
        keys = {sorted(HOSTILE_ENV) + ["SETUP_SEEN"]!r}
        json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, open({str(out)!r}, "w"))
        """))
    Path(python).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1"}
    proc = subprocess.run(["bash", str(path)], cwd=pwned, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["-u", "-m", "jobs.environments.slurm_supervise", "--run-dir", str(run.dir),
                            "--forward-notices"]
    assert seen["env"] == {**{k: v.format(pwned=pwned) for k, v in HOSTILE_ENV.items()},
                           "SETUP_SEEN": "verbatim: 2"}
    assert not list(pwned.rglob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("slurm, key", [
    ({"env": {"A": "line1\nline2"}}, "slurm.env.A"),
    ({"env": {"A": "ok\r"}}, "slurm.env.A"),
    ({"env": {"BAD-KEY": "x"}}, "slurm.env.BAD-KEY"),
    ({"env": {"1X": "x"}}, "slurm.env.1X"),
    ({"setup": ["module load a\ntouch PWNED"]}, "slurm.setup[0]"),
    ({"partition": "debug\necho PWNED"}, "slurm.partition"),
    ({"extra_sbatch": ["--reservation=a\nb"]}, "slurm.extra_sbatch[0]"),
    ({"extra_sbatch": ["-C gpu"]}, "slurm.extra_sbatch[0]"),
    ({"python": "/usr/bin/python3\nrm -rf /"}, "slurm.python"),
])
def test_unsafe_values_are_refused(tmp_path: Path, slurm: dict, key: str) -> None:
    cluster = load_cluster(str(write_cluster(tmp_path / "bad.yaml", {"partition": "debug", **slurm})))
    with pytest.raises(ConfigError) as err:
        render_sbatch(load_recipe("digits"), cluster, Run("r", tmp_path / "r"),
                      cluster.slurm.python or PYTHON)
    assert err.value.key == key and str(err.value).startswith(f"cluster config bad: {key}: ")


def test_cli_refuses_newline_with_exit_2_and_no_run_dir(tmp_path: Path, runs_dir: Path) -> None:
    cfg = write_cluster(tmp_path / "nl.yaml", {"partition": "debug", "env": {"GREETING": "a\n$(touch PWNED)"}})
    proc = run_cli("sbatch", "digits", "--cluster", str(cfg), "--run-name", "nl", runs_dir=runs_dir)
    assert proc.returncode == 2, proc.stderr
    assert "slurm.env.GREETING" in proc.stderr and "newline" in proc.stderr and "'a\\n$(touch PWNED)'" in proc.stderr
    assert proc.stdout == "" and not (runs_dir / "nl").exists()
    name = run_cli("sbatch", "digits", "--cluster", "local_slurm", "--run-name", "a\nb", runs_dir=runs_dir)
    assert name.returncode == 2 and "run name" in name.stderr and not list(runs_dir.iterdir())


def test_cli_refuses_non_slurm_cluster(runs_dir: Path) -> None:
    proc = run_cli("sbatch", "digits", "--cluster", "local", "--run-name", "x", runs_dir=runs_dir)
    assert proc.returncode == 2
    assert "backend 'local'" in proc.stderr and "--cluster local_slurm" in proc.stderr
    assert not (runs_dir / "x").exists()


def test_cli_prints_script_and_prepares_run_dir(runs_dir: Path) -> None:
    proc = run_cli("sbatch", "digits", "trainer.max_steps=5", "--cluster", "local_slurm", "--run-name", "p",
                   runs_dir=runs_dir, check=True)
    run_dir = runs_dir / "p"
    assert proc.stdout == (run_dir / "sbatch.sh").read_text()
    assert f"--run-dir {run_dir} --forward-notices\n" in proc.stdout and option_values(proc.stdout)["--job-name"] == "p"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "slurm" and info["cluster"] == "local_slurm" and "job_id" not in info
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 5
    assert (run_dir / "cluster.yaml").exists()


# ----------------------------------------------------------------------------- tier 1: trap and wait
def test_trap_forwards_signals_and_waits_for_srun_exit_code(tmp_path: Path) -> None:
    """USR2 and TERM to the batch step (the supervisor the shell became) reach srun; it keeps waiting and
    exits with srun's code, and counts nothing (the job was told to stop)."""
    log = tmp_path / "srun.log"
    fake_srun(tmp_path / "bin", f"""\
        import signal, sys, time
        got = []
        def note(signum, frame):
            got.append(signal.Signals(signum).name)
            open({str(log)!r}, "a").write(got[-1] + "\\n")
        signal.signal(signal.SIGUSR2, note)
        signal.signal(signal.SIGTERM, note)
        open({str(log)!r}, "a").write("started\\n")
        deadline = time.time() + 20  # never outlive a failed test for long
        while len(got) < 3 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # still running after the shell's `wait` was interrupted
        sys.exit(7)
        """)
    script = tmp_path / "job.sbatch"
    cluster = load_cluster("local_slurm")
    run = prepare_run(load_recipe("digits"), cluster, "t", tmp_path / "runs", "auto")
    script.write_text(render_sbatch(load_recipe("digits"), cluster, run, sys.executable))  # the real supervisor
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:  # a file, not a pipe: an orphaned fake srun must not block a read
        shell = subprocess.Popen(["bash", str(script)], env=env, stderr=err)
    deadline = time.time() + 30
    while not (log.exists() and "started" in log.read_text()):
        assert time.time() < deadline and shell.poll() is None, "fake srun never started"
        time.sleep(0.02)
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR2):
        shell.send_signal(sig)
        time.sleep(0.2)
        assert shell.poll() is None, f"the batch shell exited on {sig.name}: {stderr.read_text()}"
    assert shell.wait(timeout=30) == 7, stderr.read_text()
    assert log.read_text().split() == ["started", "SIGUSR2", "SIGTERM", "SIGUSR2"]
    assert "srun exited with status 7" in stderr.read_text()
    assert run.info().requeues == {} and not run.info().inplace_restarts  # a TERM is no crash


def test_failing_setup_line_stops_before_srun(tmp_path: Path) -> None:
    cfg = write_cluster(tmp_path / "c.yaml", {"partition": "debug", "setup": ["false", "echo after"]})
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(load_recipe("digits"), load_cluster(str(cfg)), Run("f", tmp_path / "f"), PYTHON))
    fake_srun(tmp_path / "bin", f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "after" not in proc.stdout and not (tmp_path / "ran").exists()
