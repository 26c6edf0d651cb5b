"""Secrets planted where a user can put them reach the job but no file the launcher writes (except the
0600 files that deliver them) and no line it prints, on every backend: env values holding a URL's
user info or a `?token=` (slurm.env, vms.env, skypilot.env), script arguments (`--password=...`,
`--api-key VALUE`, URLs), recipe fields that take URLs, and sweep parameters. Rendering in this process
where a launch would be slow (sbatch.sh, submitit's setup lines, workers-N.sh, the SkyPilot task, the
VM agent's command and run files); one short local script launch for the rank log and config.yaml."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from conftest import read_result, run_cli
from jobs.schema import load_cluster, load_recipe, secrets
from jobs.schema.run_dir import Run, RunResult
from launcher.backends.slurm import executor_parameters
from launcher.runs import prepare_run
from launcher.sbatch import render_sbatch, render_worker_array
from launcher.skypilot import render_task
from launcher.vms.layout import agent_command, run_files, supervisor_command

URL_PASS = "hfSECRET-url-41c7"  # a URL's user info (the part after the colon)
QUERY_TOKEN = "qTOKEN-plant-93a0"  # a ?token= value
PASSWORD = "hunter2-PLANT-5e11"  # --password=VALUE
API_KEY = "apiKEY-plant-77d2"  # --api-key VALUE (the next argument)
ENDPOINT_PASS = "endpointPW-plant-0b3c"
SETUP_PASS = "setupPW-plant-6f0e"  # in a slurm.setup line: kept in the 0600 sbatch.sh, masked when printed
PLANTED = (URL_PASS, QUERY_TOKEN, PASSWORD, API_KEY, ENDPOINT_PASS)
URL = f"https://alice:{URL_PASS}@hub.example/x"
QUERY_URL = f"https://data.example/d?token={QUERY_TOKEN}"
ENV = {"HF_ENDPOINT": URL, "DATA_URL": QUERY_URL, "NCCL_DEBUG": "WARN"}
PRIVATE = {secrets.SECRETS_FILE, "worker.json", "study.journal"}  # 0600 files that deliver real values


def _leaks(root: Path) -> list[str]:
    """Every planted string in a file under `root` but the private ones (which must be 0600)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.name in PRIVATE:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            continue
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {s}" for s in PLANTED if s.encode() in data]
    return found


def _shown(text: str) -> list[str]:
    return [s for s in PLANTED if s in text]


def _cluster(tmp_path: Path, backend: str, section: dict) -> Path:
    path = tmp_path / f"planted_{backend}.yaml"
    top = {"backend": backend} if backend != "skypilot" else {}
    endpoint = f"http://minio:{ENDPOINT_PASS}@127.0.0.1:9"
    storage = {} if backend == "skypilot" else {"storage": {"endpoint_url": endpoint}}
    path.write_text(yaml.safe_dump({**top, **storage, backend: section}))
    return path


# ----------------------------------------------------------------------------- env values, every backend
def test_env_values_holding_credentials_are_in_no_script_task_or_command(tmp_path: Path) -> None:
    recipe = load_recipe("digits", [f"model.pretrained={URL}"])
    slurm = load_cluster(str(_cluster(tmp_path, "slurm", {"partition": "debug", "time_min": 10, "env": ENV})))
    run = prepare_run(recipe, slurm, "planted", tmp_path / "runs", "auto")
    rendered = {"sbatch.sh": render_sbatch(recipe, slurm, run, sys.executable),
                "submitit setup": "\n".join(executor_parameters(recipe, slurm, "planted")["setup"]),
                "workers-1.sh": render_worker_array(recipe, slurm, tmp_path, 2, sys.executable)}
    for text in rendered.values():  # the non-secret entry is still exported; the ranks set the others
        assert "export NCCL_DEBUG=WARN" in text and "HF_ENDPOINT" not in text and "DATA_URL" not in text, text
    cfg = secrets.overlay(run.dir / "cluster.yaml", yaml.safe_load((run.dir / "cluster.yaml").read_text()))
    assert cfg["slurm"]["env"] == ENV  # what the rank entry sets in every rank

    vms = load_cluster(str(_cluster(tmp_path, "vms", {"hosts": ["127.0.0.2"], "env": ENV, "setup": ["true"]})))
    vm_run = prepare_run(recipe, vms, "planted-vm", tmp_path / "runs", "auto")
    assert vm_run.cluster().vms.env == ENV  # the agent's env, from secrets.yaml copied with its 0600
    staging = tmp_path / "staging"
    staging.mkdir()
    files = run_files(vm_run, vms.vms, "127.0.0.2", staging)
    rendered["vm agent"] = agent_command(vms.vms, "planted-vm", "127.0.0.2", 1, 1, "127.0.0.2:29400", "rid")
    rendered["vm supervisor"] = supervisor_command(vms.vms, "planted-vm", "127.0.0.2")
    assert (vm_run.dir / secrets.SECRETS_FILE, secrets.SECRETS_FILE) in files

    sky_recipe = load_recipe("digits", ["checkpoint.uri=s3://bucket/runs"])
    sky = load_cluster(str(_cluster(tmp_path, "skypilot", {"env": ENV})))
    task = render_task(sky_recipe, sky, "planted")
    rendered["skypilot task"] = task
    parsed = yaml.safe_load(task)
    assert parsed["secrets"] == {"HF_ENDPOINT": None, "DATA_URL": None}  # sky jobs launch --secret KEY
    assert parsed["envs"]["NCCL_DEBUG"] == "WARN" and "--secret DATA_URL --secret HF_ENDPOINT" in task
    assert {name: _shown(text) for name, text in rendered.items() if _shown(text)} == {}
    assert _leaks(tmp_path / "runs") == [] and _leaks(staging) == []


def test_printed_sbatch_and_skypilot_task_hold_no_credential(tmp_path: Path) -> None:
    """The two commands that print what they render, through the real CLI (`launcher sbatch` also
    prepares the run directory)."""
    runs = tmp_path / "runs"
    setup = f"pip install --index-url https://bob:{SETUP_PASS}@pypi.example/simple x"  # the user's shell line
    slurm = _cluster(tmp_path, "slurm", {"partition": "debug", "time_min": 10, "env": ENV, "setup": [setup]})
    sky = _cluster(tmp_path, "skypilot", {"env": ENV})
    out = tmp_path / "task.yaml"
    printed = []
    for args in (["sbatch", "digits", f"model.pretrained={URL}", "--cluster", str(slurm), "--run-name", "s",
                  "--runs-dir", str(runs)],
                 ["skypilot", "digits", "checkpoint.uri=s3://b/r", "--cluster", str(sky), "--out", str(out)],
                 ["skypilot", "digits", "checkpoint.uri=s3://b/r", "--cluster", str(sky)]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed.append(proc.stdout + proc.stderr)
    assert _shown("\n".join(printed)) == [] and _leaks(runs) == [] and _shown(out.read_text()) == []
    script = runs / "s" / "sbatch.sh"  # the line as written runs in the job; printed, it is masked
    assert stat.S_IMODE(script.stat().st_mode) == 0o600 and SETUP_PASS in script.read_text()
    assert SETUP_PASS not in printed[0] and "https://***@pypi.example/simple" in printed[0]


# ----------------------------------------------------------------------------- script arguments
ARGV_SCRIPT = """\
import json, sys
from pathlib import Path
Path(__file__).with_name("argv.json").write_text(json.dumps(sys.argv[1:]))
print("script ran")
"""


@pytest.mark.slow  # one real launch of a script through the CLI
def test_script_arguments_reach_the_script_but_no_file_or_line(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(ARGV_SCRIPT)
    args = [URL, f"--password={PASSWORD}", "--api-key", API_KEY, QUERY_URL, "--lr", "0.1", "{run_dir}"]
    runs = tmp_path / "runs"
    printed = []
    for command in (["run", str(script), "--run-name", "s", "--runs-dir", str(runs), "--resume-args",
                     f"--auth-token={PASSWORD}", "--", *args],
                    ["status", "s", "--runs-dir", str(runs)], ["logs", "s", "--runs-dir", str(runs)]):
        proc = run_cli(*command)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed.append(proc.stdout + proc.stderr)
    run = runs / "s"
    assert read_result(run)["outcome"] == "completed"
    assert json.loads((tmp_path / "argv.json").read_text()) == [*args[:-1], str(run.resolve())]  # byte for byte
    (tmp_path / "argv.json").unlink()  # the script's own file, not the launcher's
    assert _shown("\n".join(printed)) == [], printed
    assert _leaks(runs) == []
    header = (run / "logs" / "rank0.log").read_text().splitlines()[0]
    assert "https://***@hub.example/x --password=*** --api-key *** https://data.example/d?token=*** --lr 0.1" \
        in header, header
    shown = yaml.safe_load((run / "config.yaml").read_text())["script"]
    assert shown["args"][:4] == ["https://***@hub.example/x", "--password=***", "--api-key", "***"]
    assert shown["resume_args"] == ["--auth-token=***"]


@pytest.mark.parametrize("args, shown", [
    (["--password=p1", "--token", "t1", "--lr", "1"], ["--password=***", "--token", "***", "--lr", "1"]),
    (["--api_key", "--verbose", "x"], ["--api_key", "--verbose", "x"]),  # an option next: not a value
    (["--secret-file=/a", "-p", "x"], ["--secret-file=***", "-p", "x"]),  # short options: no name to judge
    (["https://u:p@h/x?sig=1&token=2"], ["https://***@h/x?sig=1&token=***"]),
    (["--data", "s3://b/k"], ["--data", "s3://b/k"]),
])
def test_script_arguments_as_shown(args: list[str], shown: list[str]) -> None:
    assert secrets.redact_args(args) == shown
    masked, found = secrets.split({"script": {"args": args}})
    assert masked["script"]["args"] == shown
    restored = {"script": {"args": list(shown)}}
    for path, value in found:
        secrets._set(restored, list(path), value)
    assert restored["script"]["args"] == args  # secrets.yaml gives the ranks the real ones


# ----------------------------------------------------------------------------- sweeps and private files
def test_bayes_sweep_params_and_worker_json_stay_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A Bayesian sweep over a credential-holding choice, trials stood in (no training): worker.json and the
    study journal are 0600 even where a 0644 worker.json existed, and no line or other file shows them."""
    from launcher.cli import main
    from launcher.sweeps.bayes.claims import Sweep

    def stand_in(self: Sweep, recipe: object, run: Run) -> int:
        run.write_result(RunResult(outcome="completed", step=1, metrics={"val/acc": 0.5}))
        return 0

    monkeypatch.setattr(Sweep, "run_here", stand_in)
    runs = tmp_path / "runs"
    folder = runs / "sweeps" / "planted"
    folder.mkdir(parents=True)
    for name in ("worker.json", "study.journal"):  # left by an older launcher, readable by everyone
        (folder / name).write_text("{}\n" if name == "worker.json" else "")
        os.chmod(folder / name, 0o644)
    code = main(["sweep", "digits", "trainer.max_steps=1", "--search", "bayes", "--name", "planted", "--trials", "2",
                 "--runs-dir", str(runs), "--cluster", "local", "--param", f"model.pretrained=choice:{URL},{QUERY_URL}",
                 "--param", "optim.lr=loguniform:1e-4:1e-1"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    for name in ("worker.json", "study.journal"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert URL_PASS in (folder / "worker.json").read_text()  # what a Slurm worker reads
    assert _shown(out.out + out.err) == [], out.out + out.err
    assert "model.pretrained=https://***@hub.example/x" in out.out or "token=***" in out.out, out.out
    assert _leaks(runs) == []


def test_grid_sweep_lines_and_record_mask_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A grid over credential-holding values: the trial lines, the error of a bad trial and the sweep record
    show them masked (the trials' own config.yaml: see above), trials stood in."""
    from launcher.backends import base, local
    from launcher.cli import main

    def prepare_only(planned: list[base.Planned], cluster: object, batch: object) -> base.Launched:
        for trial in planned:
            trial.prepare()  # each trial's run directory, as a real launch writes it
        return base.Launched(0, ended=True)

    monkeypatch.setattr(local, "launch_many", prepare_only)
    runs = tmp_path / "runs"
    grid = f"model.pretrained={URL},{QUERY_URL}"
    assert main(["sweep", "digits", "--grid", grid, "--name", "g", "--runs-dir", str(runs)]) == 0
    assert main(["sweep", "digits", "model.width=-1", "--grid", grid, "--name", "bad", "--runs-dir", str(runs)]) == 2
    out = capsys.readouterr()
    assert "trial g-t00: model.pretrained=https://***@hub.example/x" in out.out, out.out
    assert "with overrides model.width=-1 model.pretrained=https://***@hub" in out.err, out.err
    assert _shown(out.out + out.err) == [] and _leaks(runs) == [], out.out + out.err


def test_write_private_replaces_what_was_there(tmp_path: Path) -> None:
    """0600 whatever existed (a 0644 file, a symlink to another file, a planted temporary name): the new
    file replaces the entry, nothing is written through a link."""
    target = tmp_path / "elsewhere"
    target.write_text("theirs")
    plain, link = tmp_path / "plain.json", tmp_path / "link.json"
    plain.write_text("old")
    os.chmod(plain, 0o644)
    link.symlink_to(target)
    for name in (plain.name, link.name):  # the temporary names an older helper used
        (tmp_path / f".{name}.{os.getpid()}.tmp").symlink_to(target)
    for path in (plain, link):
        secrets.write_private(path, PASSWORD)
        assert not path.is_symlink() and path.read_text() == PASSWORD
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert target.read_text() == "theirs"


def test_resume_args_that_cannot_be_split_are_quoted_back_masked() -> None:
    from launcher.scripts import script_recipe
    from jobs.schema.errors import UsageError

    with pytest.raises(UsageError) as err:
        script_recipe("s.py", None, [], 1, 1, None, [], resume_args=f"--token={PASSWORD} 'x")
    assert PASSWORD not in str(err.value) and "--token=***" in str(err.value)
