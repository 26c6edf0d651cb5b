"""Every command the docs show is run here, shortened, so an example can never silently rot.

The commands are read from README.md and every page of docs/ (`doc_files`): each line of a ```bash block
and each form in the CLI table (docs/cli.md). CASES maps each of them to what is actually run (the same
command, shortened with overrides such as `trainer.max_steps=2`) and to text its output must contain. A
command shown anywhere but missing from CASES fails `test_every_doc_command_has_a_case`: a new example
needs its shortened form here. A command shown on several pages is one case, run once.

Everything runs in a copy of the repository, so runs, artifacts and bench results land there. `make`
runs with the running interpreter (`VENV=... PY=...`, `-o .../.installed`: no virtualenv is built).
The commands of docs/your-code.md (PROJECT_CASES) run in a copy of examples/project outside that copy, with
only the launcher on the import path, as in a user's own project.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
CLI_TABLE_HEADER = "| command | what it does |"  # the CLI table's header row (docs/cli.md)
RUN = "readme-launch"  # a finished digits run, made once (fixture `finished_run`) for the commands that need a run
AS_SHOW = "<the doc command with `launcher launch` replaced by `launcher show`>"
CI_RUNS_IT = "<run by .ci/run, not here: the suite cannot run itself>"
# `launcher stacks` needs a live run that hangs on purpose: one 2-rank launch, made by this test of test_stacks.py
LIVE_STACKS = "tests/test_stacks.py::test_stacks_names_both_ranks_of_a_live_local_run"
SHORT = "trainer.max_steps=2"
SCRIPT_DONE = "the script completed"
# Commands that two cases run: the same command line in the same folder runs once (see `check_step`).
LAUNCH_RUN = f"launcher launch digits {SHORT} --cluster local --run-name {RUN} --resume never --run-id readme0id --wait"
GRID_SWEEP = f"launcher sweep digits --cluster local --grid optim.lr=0.01,0.05 {SHORT} --name readme-grid"
LR_SMALL = f"launcher launch digits optim.lr=0.01 {SHORT} --run-name lr-0.01"
LR_BIG = f"launcher launch digits optim.lr=0.1 {SHORT} --run-name lr-0.1"
LR_DROPOUT = ("launcher sweep digits --random optim.lr=loguniform:1e-3:3e-1 --random model.dropout=uniform:0:0.5 "
              f"--trials 1 trainer.epochs=2 {SHORT} --name lr-dropout")
MY_RUN = f'make launch RECIPE=digits RUN_NAME=my-run ARGS="{SHORT}"'  # the README's tour
BAYES = ("launcher sweep digits --search bayes --param optim.lr=loguniform:1e-3:1 --param model.dropout=uniform:0:0.5 "
         f"--trials 2 --prune trainer.eval_every=1 {SHORT} --name lr-bayes")
SHARED = {LAUNCH_RUN, GRID_SWEEP, LR_SMALL, LR_BIG, LR_DROPOUT, BAYES, MY_RUN}

# doc command -> the steps run for it: (command line, text its output must contain).
# `launcher` is `python -m launcher`; `make` gets the flags of `make_command`.
CASES: dict[str, tuple[tuple[str, str], ...]] = {
    # ```bash blocks
    "make launch RECIPE=vgg_finetune": (
        (f'make launch RECIPE=vgg_finetune PRETRAIN_ARGS={SHORT} ARGS="{SHORT}"',
         "pretrained weights: artifacts/vgg_pretrain.pt"),),
    "make test": ((CI_RUNS_IT, ""),),
    "make launch RECIPE=digits": ((f'make launch RECIPE=digits ARGS="{SHORT}"', "completed at step 2"),),
    "make launch RECIPE=gpt_small": (
        # 200 kB of text, not 2 MB: evaluating 2 MB's validation windows took 5.5 s of a 13 s launch
        (f'make launch RECIPE=gpt_small ARGS="{SHORT} data.kwargs.max_bytes=200000"',
         "completed at step 2: val/loss="),),
    'make launch RECIPE=digits ARGS="trainer.epochs=2 optim.lr=0.05"': (
        ('make launch RECIPE=digits ARGS="trainer.epochs=2 optim.lr=0.05"', "completed at step"),),
    "make slurm-up && make launch RECIPE=digits CLUSTER=local_slurm": (
        ("make slurm-up", ""),
        (f'make launch RECIPE=digits CLUSTER=local_slurm ARGS="{SHORT} --wait"', "completed at step 2"),),
    "make launch RECIPE=digits RUN_NAME=my-run": ((MY_RUN, "run my-run: "),),
    # the README's tour, after that run
    "launcher status my-run": ((MY_RUN, ""), ("launcher status my-run", "state: completed")),
    "launcher plot my-run --out my-run.png": (
        (MY_RUN, ""), ("launcher plot my-run --out my-run.png", "wrote my-run.png: train/loss, val/loss")),
    "launcher doctor my-run": ((MY_RUN, ""), ("launcher doctor my-run", "run my-run: nothing wrong found")),
    "launcher plot my-run --metric samples_per_s --metric mfu --out my-run-speed.png": (
        (MY_RUN, ""), ("launcher plot my-run --metric samples_per_s --metric mfu --out my-run-speed.png",
                       "wrote my-run-speed.png: samples_per_s, mfu of my-run")),
    # `make test` runs the suite; `make test-fast` a part of it: the target is checked, not run
    "make test-fast": (("make -n test-fast", '-m pytest -q -m "not slow and not slurm and not gpu"'),),
    "make bench": (('make bench BENCH_ARGS="--only startup --startup-repeats 1"', "bench.json"),),
    "launcher launch digits optim.lr=0.01 --run-name lr-0.01": ((LR_SMALL, "completed at step 2"),),
    "launcher launch digits optim.lr=0.1 --run-name lr-0.1": ((LR_BIG, "completed at step 2"),),
    "launcher plot lr-0.01 lr-0.1 --out docs/curves.png": (
        (LR_SMALL, ""), (LR_BIG, ""),
        ("launcher plot lr-0.01 lr-0.1 --out docs/curves.png", "wrote docs/curves.png: train/loss, val/loss"),),
    # docs/your-code.md, in the example project
    "launcher launch sines": (
        ("launcher launch sines trainer.max_steps=4 trainer.eval_every=2 --run-name readme-sines", "val/mae="),),
    "launcher run train_ddp.py --procs-per-node 2 -- --steps 100": (
        ("launcher run train_ddp.py --procs-per-node 2 -- --steps 3", "[rank1] rank 1 done: 3 steps"),),
    "launcher run -m train_ddp --procs-per-node 2 -- --steps 100": (
        ("launcher run -m train_ddp --procs-per-node 2 -- --steps 3", "[rank1] rank 1 done: 3 steps"),),
    "launcher run train_ddp.py --cluster local_slurm --procs-per-node 2 --wait -- --steps 100": (
        ("launcher run train_ddp.py --cluster local_slurm --procs-per-node 2 --wait --run-name readme-slurm-ddp "
         "-- --steps 3", SCRIPT_DONE),),
    "launcher run train_ddp.py --cluster local_slurm --procs-per-node 2 --sbatch -- --steps 100": (
        ("launcher run train_ddp.py --cluster local_slurm --procs-per-node 2 --sbatch -- --steps 100", "srun"),),
    "launcher run nanogpt_style.py --procs-per-node 2 --resume-args '--init_from=resume' --run-name ng -- "
    "--out_dir={checkpoint_dir} --max_iters 200": (
        ("launcher run nanogpt_style.py --procs-per-node 2 --resume-args '--init_from=resume' --run-name ng -- "
         "--out_dir={checkpoint_dir} --max_iters 20", "[rank0] done at iter 20"),
        ("launcher run nanogpt_style.py --procs-per-node 2 --resume-args '--init_from=resume' --run-name ng -- "
         "--out_dir={checkpoint_dir} --max_iters 40", "[rank1] resuming from iter 20"),),
    "launcher run tutorial_style.py --procs-per-node 2 --run-name tut -- --total_epochs 10": (
        ("launcher run tutorial_style.py --procs-per-node 2 --run-name tut -- --total_epochs 2",
         "Training snapshot saved at snapshot.pt"),
        ("launcher run tutorial_style.py --procs-per-node 2 --run-name tut -- --total_epochs 3",
         "Resuming training from snapshot at Epoch 2"),),
    "launcher run lightning_style.py --cluster local_slurm --procs-per-node 2 --wait -- --root={checkpoint_dir} "
    "--steps 300": (
        ("launcher run lightning_style.py --cluster local_slurm --procs-per-node 2 --wait --run-name readme-pl -- "
         "--root={checkpoint_dir} --steps 6 --every 3", SCRIPT_DONE),),
    "launcher run train_resumable.py --procs-per-node 2 --run-name res -- --steps 200": (
        ("launcher run train_resumable.py --procs-per-node 2 --run-name res -- --steps 20", SCRIPT_DONE),
        ("launcher run train_resumable.py --procs-per-node 2 --run-name res -- --steps 20", "resumed at step 20"),),
    # one rank and one small block: what is compiled, and how long it takes, is the block's graph per process
    "launcher launch gpt_small trainer.compile=true parallel.activation_checkpointing=selective": (
        (f"launcher launch gpt_small trainer.compile=true parallel.activation_checkpointing=selective {SHORT} "
         "parallel.procs_per_node=1 trainer.global_batch=8 trainer.micro_batch=8 model.kwargs.dim=32 "
         "model.kwargs.layers=1 model.kwargs.seq_len=32 data.kwargs.seq_len=32 data.kwargs.max_bytes=50000 "
         "--run-name readme-compile",
         "torch.compile: the blocks' forward passes compiled in"),),
    # needs a GPU cluster: its arguments are validated by `show` instead
    "launcher launch vgg_finetune --cluster cluster_configs/examples/gpu_cluster.yaml parallel.nodes=2 "
    "parallel.procs_per_node=8 trainer.global_batch=512 model.pretrained=s3://bucket/vgg11-8a719046.pth "
    "model.width=1 model.hidden=4096 model.pool_size=7 model.image_size=224 data.name=image_folder "
    "data.root=s3://bucket/flowers model.num_classes=5": ((AS_SHOW, "world size 16"),),
    "make vms-up && launcher launch digits --cluster local_vms parallel.procs_per_node=1 --wait": (
        ("make vms-up", ""),
        # a run name of its own: the "VMs" keep their folders (in /tmp/launcher-vms) from one test run to the next,
        # and a pid alone comes back (a run of an earlier session once held this pid's name)
        (f"launcher launch digits --cluster local_vms parallel.procs_per_node=1 {SHORT} --run-name readme-vms-"
         f"{os.getpid()}-{time.time_ns() % 10**9} --wait", "completed at step 2"),),
    "launcher skypilot digits --cluster skypilot_aws parallel.procs_per_node=1 "
    "checkpoint.uri=s3://my-bucket/checkpoints --out task.yaml": (
        ("launcher skypilot digits --cluster skypilot_aws parallel.procs_per_node=1 "
         "checkpoint.uri=s3://my-bucket/checkpoints --out task.yaml", "wrote task.yaml"),),
    # the CLI table
    "launcher show RECIPE [k=v ...] [--cluster C]": (
        ("launcher show digits trainer.epochs=3 --cluster local", "epochs: 3"),),
    "launcher launch RECIPE [k=v ...] [--cluster C] [--run-name N] [--resume {auto,never}] [--run-id ID] [--wait]": (
        (LAUNCH_RUN, "completed at step 2"),
        (f"launcher status {RUN}", "state: completed"),),
    "launcher run SCRIPT [k=v ...] [--procs-per-node N] [--nodes N] [--cluster C] [--run-name N] [--wait] "
    "[--sbatch [--submit]] [-- ARGS]": (
        ("launcher run train_ddp.py checkpoint.keep_last=1 --procs-per-node 2 --nodes 1 --cluster local "
         "--run-name readme-script --wait -- --steps 3", SCRIPT_DONE),
        ("launcher status readme-script", "state: completed"),),
    "launcher skypilot RECIPE [k=v ...] --cluster C [--run-name N] [--out FILE]": (
        ("launcher skypilot digits --cluster skypilot_aws parallel.procs_per_node=1 --run-name readme-sky",
         "exec python3 -m jobs.environments.skypilot"),),
    "launcher export RUN --to model.pt": ((f"launcher export {RUN} --to model.pt", "wrote model.pt"),),
    "launcher status RUN": ((f"launcher status {RUN}", "state: completed"),),
    "launcher launch digits trainer.micro_batch=auto": (
        (f"launcher launch digits trainer.micro_batch=auto {SHORT} --run-name readme-auto",
         "micro batch 32 x accumulation 1 x 2 ranks = 64 (auto: searched 1 fits, 2 fits"),),
    "launcher doctor [RUN] [--cluster C] [--store URI]": (
        (f"launcher doctor {RUN}", f"run {RUN}: nothing wrong found"),
        ("launcher doctor --cluster local", "ok   torch: torch "),),
    "launcher plot RUN [RUN ...] [--metric M ...] --out FILE": (
        (f"launcher plot {RUN} --metric val/acc --metric train/loss --out table-curves.svg",
         f"wrote table-curves.svg: val/acc, train/loss of {RUN}"),),
    "launcher logs RUN [--rank N] [--follow]": ((f"launcher logs {RUN} --rank 1 --follow", "rank 1 of 2"),),
    "launcher cancel RUN": ((f"launcher cancel {RUN}", "is not running"),),
    "launcher stacks RUN": ((LIVE_STACKS, ""),),
    "launcher sbatch RECIPE --cluster C [--submit]": (
        (f"launcher sbatch digits --cluster local_slurm {SHORT} --run-name readme-sbatch", "srun"),),
    "launcher sweep RECIPE --cluster C --grid k=a,b ...": ((GRID_SWEEP, "sweep readme-grid: 2 trials"),),
    "--random k=loguniform:lo:hi --trials N": (
        (f"launcher sweep digits --cluster local --random optim.lr=loguniform:1e-3:1e-1 --trials 1 {SHORT} "
         "--name readme-random", "sweep readme-random: 1 trials"),),
    "launcher sweep-status SWEEP [--plot FILE]": (
        (GRID_SWEEP, ""),
        ("launcher sweep-status readme-grid", "by val/acc (max), best first"),
        ("launcher sweep-status readme-grid --plot grid.pdf", "wrote grid.pdf: val/acc by trial"),),
    "launcher sweep digits --random optim.lr=loguniform:1e-3:3e-1 --random model.dropout=uniform:0:0.5 --trials 8 "
    "trainer.epochs=2 --name lr-dropout": ((LR_DROPOUT, "sweep lr-dropout: 1 trials"),),
    "launcher sweep digits --search bayes --param optim.lr=loguniform:1e-3:1 --param model.dropout=uniform:0:0.5 "
    "--trials 20 --prune trainer.eval_every=20 --name lr-bayes": ((BAYES, "best trial: lr-bayes-t0"),),
    "launcher sweep-status lr-bayes": (
        (BAYES, ""), ("launcher sweep-status lr-bayes", "study lr-bayes: 2 of 2 trials"),),
    "launcher sweep RECIPE --search bayes --param k=loguniform:lo:hi ... --trials N [--prune] [--workers K]": (
        ("launcher sweep digits --search bayes --param optim.lr=loguniform:1e-3:1 --trials 2 --prune --workers 2 "
         f"{SHORT} --name readme-bayes", "study readme-bayes: 2 of 2 trials: 2 completed"),),
    "launcher sweep-status lr-dropout --plot docs/sweep.png": (
        (LR_DROPOUT, ""),
        ("launcher sweep-status lr-dropout --plot docs/sweep.png", "wrote docs/sweep.png: val/acc by trial"),),
}
SLURM_CASES = {"make slurm-up && make launch RECIPE=digits CLUSTER=local_slurm",
               "launcher run train_ddp.py --cluster local_slurm --procs-per-node 2 --wait -- --steps 100"}
PROJECT_CASES = {command for command in CASES if command.startswith(("launcher launch sines", "launcher run "))}


# ----------------------------------------------------------------------------- reading the docs
def _one_line(text: str) -> str:
    return " ".join(text.split())


def shell_block_commands(text: str) -> list[str]:
    """Each command of a ```bash block: continuation lines joined, trailing `# comments` dropped."""
    commands, language, pending = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
            continue
        if language not in SHELL_BLOCKS:
            continue
        line = re.sub(r"\s+#\s.*$", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if (pending + line).strip():
            commands.append(_one_line(pending + line))
        pending = ""
    return commands


def cli_table_commands(text: str) -> list[str]:
    """Each code span in the first column of a CLI table (one headed `| command | what it does |`), e.g.
    `launcher status RUN` / `launcher logs ...`."""
    commands, in_table = [], False
    for row in text.splitlines():
        if row.strip() == CLI_TABLE_HEADER:
            in_table = True
            continue
        if not row.startswith("|"):
            in_table = False
        if in_table and row.startswith("| `"):
            first_cell = re.split(r"(?<!\\)\|", row)[1]
            commands += [_one_line(span.replace("\\|", "|")) for span in re.findall(r"`([^`]+)`", first_cell)]
    return commands


def doc_files() -> list[Path]:
    """README.md and every page of the docs site."""
    return [README, *sorted(DOCS.glob("*.md"))]


def doc_commands() -> dict[str, list[str]]:
    """Each command shown anywhere -> the files that show it (relative to the repository)."""
    found: dict[str, list[str]] = {}
    for path in doc_files():
        text = path.read_text()
        for command in shell_block_commands(text) + cli_table_commands(text):
            found.setdefault(command, []).append(str(path.relative_to(REPO)))
    return found


# ----------------------------------------------------------------------------- running them
@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's sources in a temporary folder: the commands write runs/, artifacts/, bench/results/."""
    copy = tmp_path_factory.mktemp("readme") / "repo"
    junk = shutil.ignore_patterns("__pycache__", "results", "*.egg-info")
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md", "mkdocs.yml"):
        shutil.copy2(REPO / name, copy / name)
    for name in ("bench", "cluster_configs", "docs", "jobs", "launcher", "recipes", "scripts"):
        shutil.copytree(REPO / name, copy / name, ignore=junk)
    return copy


@pytest.fixture(scope="module")
def project_copy(repo_copy: Path) -> Path:
    """The example project, copied out of the repository copy: its own folder, as a user's would be."""
    copy = repo_copy.parent / "project"
    shutil.copytree(REPO / "examples" / "project", copy, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return copy


def make_command(args: list[str]) -> list[str]:
    """`make` with this interpreter as the virtualenv, which make must not rebuild."""
    venv = Path(sys.prefix)
    return ["make", f"VENV={venv}", f"PY={sys.executable}", "-o", f"{venv}/.installed", *args]


def run_step(command: str, cwd: Path, launcher_path: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] == "make":
        argv = make_command(argv[1:])
    elif argv[0] == "launcher":
        argv = [sys.executable, "-m", "launcher", *argv[1:]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LAUNCHER_RUNS_DIR", "LAUNCHER_CLUSTER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(launcher_path))  # ranks import the copy too
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


_succeeded: dict[tuple[str, Path], str] = {}  # (command, folder) -> output, of the steps that succeeded


def check_step(command: str, expect: str, cwd: Path, launcher_path: Path | None = None) -> None:
    """Run `command` in `cwd` with the launcher of `launcher_path` (default: `cwd`, the repository copy).

    A SHARED command that already succeeded in that folder (two cases use each) is not run again: its
    output is checked instead, as running it again would only find its run done."""
    output = _succeeded.get((command, cwd))
    if output is None:
        proc = run_step(command, cwd, launcher_path or cwd)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{output[-4000:]}"
        if command in SHARED:  # not any repeated command: a case may run one twice on purpose (to resume)
            _succeeded[(command, cwd)] = output
    assert expect in output, f"{command}: {expect!r} not in its output:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def finished_run(repo_copy: Path) -> str:
    check_step(LAUNCH_RUN, "completed at step 2", repo_copy)
    return RUN


def _params() -> list:
    return [pytest.param(command, marks=[pytest.mark.slurm] if command in SLURM_CASES else [], id=command[:60])
            for command, steps in CASES.items() if steps[0][0] not in (CI_RUNS_IT, LIVE_STACKS)]


def test_every_doc_command_has_a_case() -> None:
    """The commands shown across README.md and docs/*.md are exactly the commands CASES runs."""
    found = doc_commands()
    missing = {c: files for c, files in found.items() if c not in CASES}
    assert not missing, f"the docs show commands that tests/test_readme.py does not run; add them to CASES: {missing}"
    stale = [c for c in CASES if c not in found]
    assert not stale, f"CASES lists commands that no doc file shows any more: {stale}"


def test_doc_commands_are_found_on_their_pages() -> None:
    """Each topic's commands are read from its own page, and the README's from the README."""
    found = doc_commands()
    assert "README.md" in found["make launch RECIPE=digits RUN_NAME=my-run"]
    assert "docs/cli.md" in found["launcher status RUN"]
    assert "docs/your-code.md" in found["launcher launch sines"]
    assert "docs/sweeps.md" in found["launcher sweep-status lr-bayes"]


def test_readme_parsing_finds_continued_lines_and_table_forms() -> None:
    text = ("```bash\nmake a   # comment\nlauncher b \\\n  c=1\n```\n```yaml\nkey: v\n```\n"
            f"## CLI\n\n{CLI_TABLE_HEADER}\n| --- | --- |\n"
            "| `launcher x RUN` / `launcher y [--r a\\|b]` | `launcher not_this` |\n\n## Next\n| `launcher z` | |\n"
            "| key | what |\n| --- | --- |\n| `model.name` | |\n")
    assert shell_block_commands(text) == ["make a", "launcher b c=1"]
    assert cli_table_commands(text) == ["launcher x RUN", "launcher y [--r a|b]"]


def test_make_test_is_what_ci_runs() -> None:
    """`make test` runs this suite, so it is not run from inside it: CI runs it, and it runs pytest."""
    assert CASES["make test"] == ((CI_RUNS_IT, ""),)
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()
    dry = subprocess.run(make_command(["-n", "test"]), cwd=REPO, capture_output=True, text=True, check=True)
    assert f"{sys.executable} -m pytest" in dry.stdout


def test_stacks_is_run_live_by_its_own_test() -> None:
    """`launcher stacks RUN` only answers for a live run: the test named runs it on one that hangs on purpose
    (and checks what it prints); one 2-rank launch in the suite, not two."""
    path, name = LIVE_STACKS.split("::")
    import test_stacks

    assert (REPO / path).is_file() and callable(getattr(test_stacks, name))
    assert "launcher stacks" in (REPO / "docs" / "doctor.md").read_text()


@pytest.mark.parametrize("readme_command", _params())
@pytest.mark.slow  # each doc command runs, shortened, in a copy of the repo
def test_readme_command_runs(readme_command: str, repo_copy: Path, request: pytest.FixtureRequest) -> None:
    """`readme_command` is shown in README.md or a page of docs/ (see `doc_commands`)."""
    if readme_command in SLURM_CASES:
        request.getfixturevalue("slurm")
    steps = CASES[readme_command]
    if any(RUN in command for command, _ in steps):
        request.getfixturevalue("finished_run")
    cwd = request.getfixturevalue("project_copy") if readme_command in PROJECT_CASES else repo_copy
    for command, expect in steps:
        if command == AS_SHOW:
            command = readme_command.replace("launcher launch ", "launcher show ", 1)
        check_step(command, expect, cwd, repo_copy)
