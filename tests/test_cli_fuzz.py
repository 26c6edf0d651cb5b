"""Tier 1, property-based: whatever a user types after `launcher run` (options and `-- ARGS`), into a sweep's
`--grid`/`--random`/`--param`, or writes into a cluster config's `vms:` or `skypilot:` section, the command
ends with exit 0 or with exit 2 and one `error:` line (plus an optional HINT line): never a traceback, never
another exit code, never a hang; and a refused command creates nothing (a command that succeeds creates
only its run or sweep folder, or its --out file). argparse's own refusals keep argparse's shape: its usage
lines, then one `launcher CMD: error: ...` line.

Everything runs in-process through `launcher.cli.main`. No rank ever starts: each backend's start points
(`_START_POINTS`) are replaced by one that raises `_WouldStart`, which counts as exit 0; everything before
them (the checks, the run directory, a Bayesian sweep's study and its first claimed trial) runs for real.
VM checks stop where they would connect over SSH; `vms.hosts_command` only ever runs commands that print.
Each property runs 500 derandomized examples (2,000 in all), so CI sees the same ones."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from launcher import cli, cli_args

TOOL_CACHES = {".hypothesis", ".pytest_cache", "__pycache__"}  # written by the test tools, never by the launcher
BOUND_S = 20  # per command: the slowest example measured takes well under a second
FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class _WouldStart(Exception):
    """Raised where ranks, workers or jobs would start (or a VM be reached): the command got that far."""


def _would_start(*_args: Any, **_kwargs: Any) -> Any:
    for value in [*_args, *_kwargs.values()]:  # coroutines of the SSH probes that will never be awaited
        for coro in value.values() if isinstance(value, dict) else []:
            getattr(coro, "close", lambda: None)()
    raise _WouldStart


# Where ranks, workers or jobs would start. Locally that is Popen, the backend's one use of subprocess, so a
# Bayesian sweep's in-process worker runs for real up to its first trial's ranks; Slurm's are the functions that
# submit (through submitit or sbatch); a VM's is the first SSH connection (the probes of every host).
_START_POINTS = {"launcher.backends.local.subprocess": SimpleNamespace(Popen=_would_start),
                 **{f"launcher.backends.slurm.{f}": _would_start
                    for f in ("launch", "launch_many", "launch_workers", "run_trial_here")},
                 "launcher.sbatch.submit": _would_start, "launcher.vms.ssh.gather_hosts": _would_start}


# ----------------------------------------------------------------------------- the property
def _tree(box: Path) -> set[str]:
    """Every path under `box`, and the repository's top level (a stray file lands there, in the launch folder)."""
    out = {str(REPO / name) for name in os.listdir(REPO) if name not in TOOL_CACHES}
    for root, dirs, files in os.walk(box):
        out |= {os.path.join(root, name) for name in dirs + files}
    return out


@contextlib.contextmanager
def _bounded(seconds: int) -> Iterator[None]:
    def late(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"the command ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _argparse_refusal(lines: list[str]) -> bool:
    """argparse's own refusal: its usage lines, then `launcher CMD: error: ...` as the one last line."""
    return lines[0].startswith("usage: ") and lines[-1].startswith("launcher ") and ": error: " in lines[-1] \
        and not any(": error: " in line for line in lines[:-1])


def _ends_cleanly(argv: list[str], box: Path, created_ok: list[Path]) -> int:
    """The property, for one command line run from `box`: the exit code (0 or 2), its stderr shaped as said
    above, and nothing new in `box` or the repository unless the command succeeded (then only `created_ok`)."""
    before = _tree(box)
    # as a UTF-8 terminal's: printing a lone surrogate (a non-UTF-8 byte of the command line) to stdout fails
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    started = time.monotonic()
    with _bounded(BOUND_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        except _WouldStart:
            code = 0
    assert time.monotonic() - started < BOUND_S
    text = err.buffer.getvalue().decode()
    lines = text.splitlines()
    assert "Traceback" not in text and code in (0, 2), (code, text)
    new = _tree(box) - before
    if code == 2:
        assert lines and (_argparse_refusal(lines) or (lines[0].startswith("error: ") and len(lines) <= 2
                          and all(line.startswith("  HINT: ") for line in lines[1:]))), text
        assert not new, (sorted(new)[:5], text)
    else:
        assert not any(line.startswith("error:") for line in lines), text
        assert all(any(Path(p).is_relative_to(ok) for ok in created_ok) for p in new), (sorted(new)[:5], text)
    for ok in created_ok:  # the next example starts from the same tree
        if ok.is_dir():
            for inside in ok.iterdir():
                shutil.rmtree(inside) if inside.is_dir() and not inside.is_symlink() else inside.unlink()
        elif ok.exists() or ok.is_symlink():
            ok.unlink()
    return code


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder the commands run in: a script, a package, a folder, a FIFO, a runs directory."""
    box = tmp_path_factory.mktemp("cli-fuzz")
    (box / "s.py").write_text("print('hi')\n")
    (box / "pkg").mkdir()
    (box / "pkg" / "__init__.py").write_text("")
    (box / "pkg" / "train.py").write_text("")
    (box / "folder").mkdir()
    os.mkfifo(box / "fifo")
    os.symlink("loop", box / "loop")  # a symlink to itself
    (box / "runs").mkdir()
    (box / "key").write_text("not a key\n")
    (box / "key").chmod(0o600)
    (box / "open_key").write_text("not a key\n")
    (box / "open_key").chmod(0o644)
    with pytest.MonkeyPatch.context() as mp:
        # the CLI builds its parsers anew at every call (9 ms, mostly gettext lookups): built once here, the
        # 2,000 examples fit the suite's time; parsing is the same
        parsers = cli_args.build_parser(cli.COMMANDS)
        mp.setattr(cli_args, "build_parser", lambda commands: parsers)
        for point, stand_in in _START_POINTS.items():
            mp.setattr(point, stand_in)
        mp.chdir(box)
        yield box


# ----------------------------------------------------------------------------- hostile pieces
def _values(box: str) -> list[str]:
    """Option values and arguments that have broken CLIs. No NUL: a command line cannot carry one."""
    # "x" * 100_000 and ";" * 100_000: one argument may hold 128 KiB; the secret patterns once scanned a run of
    # scheme characters or separators again from each character (40,000 letters: 50 s in `launcher run`)
    return ["", " ", "-1", "0", "1", "2", "3", "100000", "1e999", "nan", "inf", "-", "--", "=", "a=b", "-x",
            "x" * 300, "x" * 100_000, ";" * 100_000, "x/" * 2100, "\n", "a\nb", "a\rb", "\x1b[31m", "é", "\u2028", "caf\udce9", "$(touch pwned)", "`touch x`",
            ";touch x", "|", "&&", "'", '"', "{run_dir}", "{checkpoint_dir}", "{", "%s", "https://u:tok@h/x",
            "--password=hunter2", "~", "/", "/dev/null", "/proc/x", ".", "..", "../x", "run", "code",
            f"{box}/s.py", f"{box}/folder", f"{box}/fifo", f"{box}/missing", "s.py", "folder", "fifo", "loop", "missing.py",
            "pkg", "pkg.train", "pkg.missing", "1pkg", "os"]


def _texts(box: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(_values(box)), st.sampled_from(_values(box)),
                     st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20))


_PARSERS = cli_args.build_parser(cli.COMMANDS)[1]


def _options(command: str, *, skip: set[str]) -> list[str]:
    """The command's own option names (from its parser, so new options are fuzzed too)."""
    parsers = _PARSERS
    return sorted(o for o in parsers[command]._option_string_actions if o not in {"-h", "--help", *skip})


def _mostly(fitting: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any], one_in: int = 6) -> st.SearchStrategy[Any]:
    """One hostile value in `one_in`, so that most inputs get past the first check to the ones behind it."""
    return st.sampled_from([fitting] * (one_in - 1) + [hostile]).flatmap(lambda chosen: chosen)


def _option_tokens(names: list[str], plausible: dict[str, list[str]], values: st.SearchStrategy[str],
                   extra: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """Mostly `--opt VALUE` with a value that fits the option, sometimes a hostile one, `--opt=VALUE`, a bare
    `--opt` or something `extra` (overrides, stray values)."""
    def pair(name: str) -> st.SearchStrategy[list[str]]:
        fitting = st.sampled_from(plausible[name]) if plausible.get(name) else values
        value = _mostly(fitting, values)
        return st.one_of(value.map(lambda v: [name, v]), value.map(lambda v: [name, v]),
                         value.map(lambda v: [f"{name}={v}"])) if plausible.get(name, True) else st.just([name])

    one = st.one_of(*(pair(n) for n in names), extra.map(lambda v: [v]))
    return st.lists(one, max_size=5).map(lambda parts: sum(parts, []))


# ----------------------------------------------------------------------------- launcher run
def _run_values(box: str) -> dict[str, list[str]]:
    """Values that fit each `launcher run` option (an empty list: a flag, which takes none)."""
    return {"--nodes": ["1", "1", "2", "0", "-1", "100000"], "--procs-per-node": ["1", "1", "2", "0", "-1"],
            "--code-dir": [box, ".", "folder", "pkg", "missing", "fifo", "s.py", "/", "~"],
            "--run-name": ["r1", "r1", "a" * 300, "../x", "-x", "a b"], "--run-id": ["0123abcd", "../x", "a" * 300],
            "--resume-args": ["--init_from=resume", "--lr {checkpoint_dir}", "'unclosed", "--password=x", "--"],
            "--workdir": ["run", "code"], "--resume": ["auto", "never"], "-m": ["pkg.train", "pkg", "os", "1pkg",
                                                                                "pkg.missing", "json.tool"],
            "--wait": [], "--sbatch": [], "--submit": []}


OVERRIDES = ["parallel.nodes=2", "parallel.procs_per_node=2", "checkpoint.uri=s3://u:p@b/x", "script.args=[1]",
             "script.path=x.py", "script.module=pkg.train", "code_dir=folder", "trainer.epochs=1", "nope=1",
             "script.workdir=code", "name=../x", "script.resume_args=[a]", "checkpoint.every_steps=0"]


@st.composite
def run_command_lines(draw: st.DrawFn, box: str) -> list[str]:
    values = _texts(box)
    head = draw(st.sampled_from([["s.py"], ["s.py"], [f"{box}/s.py"], ["-m", "pkg.train"], []]))
    extra = st.one_of(st.sampled_from(OVERRIDES), st.sampled_from(OVERRIDES), values)
    tokens = draw(_option_tokens(_options("run", skip={"--runs-dir", "--cluster"}), _run_values(box), values, extra))
    cluster = draw(st.sampled_from(["local"] * 6 + ["local_slurm"] * 3 + ["local_vms", "nope", "", f"{box}/fifo",
                                                                          f"{box}/folder", "../x"]))
    if cluster == "local_slurm" and draw(st.booleans()):
        tokens.append("--sbatch")  # the job script rendered from all of it (submitted: a start point)
    tail = draw(st.one_of(st.just([]), st.lists(values, max_size=4).map(lambda args: ["--", *args])))
    return ["run", *head, *tokens, "--cluster", cluster, "--runs-dir", f"{box}/runs", *tail]


@FUZZ
@given(data=st.data())
def test_any_run_command_line(box: Path, data: st.DataObject) -> None:
    argv = data.draw(run_command_lines(str(box)))
    _ends_cleanly(argv, box, [box / "runs"])


# ----------------------------------------------------------------------------- sweeps: --grid, --random, --param
SWEEP_KEYS = ["optim.lr", "trainer.seed", "model.dropout", "optim.momentum", "trainer.micro_batch"]
ODD_KEYS = ["nope", "", " ", "optim", "optim.lr.x", "a=b", "--grid", "trainer.seed ", "trainer.global_batch"]
SWEEP_VALUES = ["1e-3", "0.1", "0.5", "1", "2", "0", "16"]
ODD_VALUES = ["-1", "[1, 2]", "{a: 1}", "[1,", "]", "", " ", "nan", "1e999", ".inf", "x", "x" * 300, "null", "~",
              "!!python/object:os.system", "&a", "*a", "'", "https://u:tok@h/x", "é", "--trials", "0x10", "1_000"]
BOUNDS = ["1e-4:1e-1", "0:1", "1:8", "0.1:0.5"]
ODD_BOUNDS = ["0:0", "1:0", "-1:1", "1e999:1e999", "nan:1", "-inf:inf", "1:2:3", "", ":", "a:b", "1e-4", "0x1:0x2",
              "1_0:2_0", "18446744073709551616:18446744073709551617", "1e-320:1e-310"]


def _space_item(distribution: bool) -> st.SearchStrategy[str]:
    """`KEY=V1,V2` (grid) or `KEY=DIST:ARGS` (random, param): mostly fitting, each part now and then odd."""
    key = _mostly(st.sampled_from(SWEEP_KEYS), st.sampled_from(ODD_KEYS))
    value = _mostly(st.sampled_from(SWEEP_VALUES), st.sampled_from(ODD_VALUES))
    many = st.one_of(st.lists(value, min_size=1, max_size=3).map(",".join),
                     st.just(",".join(map(str, range(1001)))))  # too many trials
    bounded = st.tuples(_mostly(st.sampled_from(["uniform", "loguniform", "randint"]),
                                st.sampled_from(["normal", "", "choice", "UNIFORM"])),
                        _mostly(st.sampled_from(BOUNDS), st.sampled_from(ODD_BOUNDS))).map(":".join)
    dist = st.one_of(bounded, bounded, many.map(lambda v: f"choice:{v}"))
    return st.tuples(key, dist if distribution else many).map("=".join)


def _sweep_values() -> dict[str, Any]:
    return {"--grid": _space_item(False), "--random": _space_item(True), "--param": _space_item(True),
            "--trials": ["1", "2", "3", "0", "-1", "100000"], "--seed": ["0", "1", "-1", str(2 ** 64)],
            "--name": ["s1", "s1", "../x", "a" * 300, "-x"], "--max-parallel": ["1", "2", "0", "-1"],
            "--search": ["bayes"], "--workers": ["1", "2", "0", "-1"], "--wait": [], "--prune": []}


@st.composite
def sweep_command_lines(draw: st.DrawFn, box: str) -> list[str]:
    """A grid, random or Bayesian sweep as it is meant, then some more options (of any search, fitting or not)."""
    values, fitting = _texts(box), _sweep_values()
    search = draw(st.sampled_from(["grid", "random", "bayes"]))
    flag = {"grid": "--grid", "random": "--random", "bayes": "--param"}[search]
    space = draw(st.lists(_space_item(search != "grid"), min_size=1, max_size=2,
                          unique_by=lambda item: item.partition("=")[0]))
    head = {"grid": [], "random": ["--trials", "2"], "bayes": ["--search", "bayes", "--trials", "2"]}[search]
    tokens = []
    for name in draw(st.lists(st.sampled_from(_options("sweep", skip={"--runs-dir", "--cluster"})), max_size=2)):
        fit = fitting.get(name)
        if fit == []:
            tokens.append(name)
            continue
        fit = fit if isinstance(fit, st.SearchStrategy) else st.sampled_from(fit) if fit else values
        tokens += [name, draw(_mostly(fit, values))]
    overrides = draw(st.lists(st.sampled_from(["trainer.epochs=1", "optim.lr=0.1", "nope=1", "=", "x"]), max_size=2))
    cluster = draw(st.sampled_from(["local"] * 5 + ["local_slurm"] * 2 + ["local_vms", "nope"]))
    return ["sweep", "digits", *head, *sum(([flag, item] for item in space), []), *tokens, *overrides,
            "--cluster", cluster, "--runs-dir", f"{box}/runs"]


@FUZZ
@given(data=st.data())
def test_any_sweep_space(box: Path, data: st.DataObject) -> None:
    argv = data.draw(sweep_command_lines(str(box)))
    _ends_cleanly(argv, box, [box / "runs"])


# ----------------------------------------------------------------------------- vms: and skypilot: sections
def _yaml_values(box: str) -> list[Any]:
    """Values that have broken config sections: wrong types, limits, NUL and other control characters."""
    return ["", " ", "\x00", "a\nb", "\x1b[31m", "x" * 300, "-x", "$(touch pwned)", ";touch x", "{host}", "~", "/",
            f"{box}/missing", f"{box}/folder", f"{box}/fifo", "https://u:tok@h/x", 0, -1, 1, 2 ** 64, 10 ** 400,
            1.5, float("nan"), float("inf"), True, None, [], {}, [1], ["a"], {"a": 1}, "é", "\u2028"]


def _section(fitting: dict[str, list[Any]], box: str, one_of: tuple[str, ...] = ()) -> st.SearchStrategy[dict]:
    """A section with some of its keys, each mostly a fitting value (unknown keys: test_config_fuzz), and
    mostly exactly one of the keys `one_of`."""
    hostile = st.sampled_from(_yaml_values(box))
    keyed = {k: _mostly(st.sampled_from(v), hostile, one_in=40) for k, v in fitting.items()}  # ~10 keys each
    if "hosts_command" in keyed:  # never a hostile value: it runs in a shell here
        keyed["hosts_command"] = st.sampled_from(fitting["hosts_command"])
    optional = st.fixed_dictionaries({}, optional={k: v for k, v in keyed.items() if k not in one_of})
    if not one_of:
        return optional
    exclusive = st.sampled_from([one_of[0]] * 3 + list(one_of[1:])).flatmap(lambda key: st.fixed_dictionaries({key: keyed[key]}))
    either = _mostly(exclusive, st.fixed_dictionaries({}, optional={k: keyed[k] for k in one_of}), one_in=10)
    return st.tuples(optional, either).map(lambda parts: {**parts[0], **parts[1]})


def _vms_fitting(box: str) -> dict[str, list[Any]]:
    return {
        "hosts": [["127.0.0.2"], ["127.0.0.2", "127.0.0.3"]] * 4 + [["127.0.0.2", "127.0.0.2"], [], ["::1"],
                  ["h-1.example"], ["a b"], ["-oProxyCommand=x"], "127.0.0.2", [1], [None], [""], ["h:22"],
                  ["127.0.0.9;touch${IFS}/x"]],
        "env": [{"OMP_NUM_THREADS": "1"}, {"A=B": "x"}, {"": "x"}, {"X": "a\nb"}, {"X": 1}, {"X": "https://u:p@h/x"}],
        "setup": [["source env.sh"], ["source env.sh  # activate"], ["a;"], [], ["a\nb"], "pip"],
        # only commands that print or fail: the property must not run arbitrary shell code
        "hosts_command": ["echo 127.0.0.2", "printf '127.0.0.2\\n127.0.0.3\\n'", "true", "false", "echo -- -x",
                          "echo 'a;b'", "echo h; echo h", "echo 'a b'", "exit 3", "echo x >&2; exit 1", ""],
        "user": ["root", "ubuntu", "", "-oProxyCommand=x", "a b", "a\nb"],
        "identity_file": [f"{box}/key", f"{box}/open_key", f"{box}/missing", f"{box}/folder", f"{box}/fifo", "",
                          "~/.ssh/nope", "x" * 5000],
        "port": [22, 2222, 0, 65536, -1, "22"], "rdzv_port": [29400, 0, 65536],
        "known_hosts": ["ignore", "", f"{box}/missing", "~/.ssh/known_hosts"],
        "connect_timeout_s": [15, 1, 0, -1, 1e999], "remote_dir": ["~/launcher", "/tmp/x/{host}", "", "a\nb", "$(x)"],
        "code": ["sync", "sync", "sync", "image", "copy"], "code_path": ["/opt/project", "", "~"],
        "python": ["python3", "/usr/bin/python3", "", "python3 -u"],
        "provider": ["none", "gce", "aws", "azure"],
        "metadata_url": ["http://169.254.169.254", "http://{host}:8080", "ftp://x", "", "http://u:p@h"],
        "notice_poll_s": [5.0, 0.1, 0, -1, float("nan")], "host_wait_s": [600, 0, -1],
        "max_preemptions": [20, 0, -1], "max_failures": [1, 0, -1],
    }


def _skypilot_fitting(box: str) -> dict[str, list[Any]]:
    return {
        "cloud": ["gcp", "aws", "gcp", "aws", "", "g c p", "-x"], "region": ["us-central1"] * 4 + ["", "a/b"],
        "accelerators": ["A100:2", "A100:2", "L4:2", "A100:1", "L4", "tpu-v5e-8", "A100:0", "A100:-1",
                         "A100:" + "9" * 30, "A100:8:1", ""],  # digits runs 2 ranks per node
        "cpus": ["8", "8+", "32.5+", "", "-1", "1e999"], "memory": ["32+", "0", "+", ""],
        "disk_size": [256, 100, 50, 256, 0, -1, 10 ** 20, "256"], "image_id": ["projects/x/images/y", "", "a\nb"],
        "use_spot": [True, False, True, False, "yes"], "job_recovery": ["EAGER_NEXT_REGION", "FAILOVER"] * 2 + ["x"],
        "max_restarts_on_errors": [0, 2, -1], "setup": [["pip install -e ."], ["a", "b"], ["a\nb"], [""], "pip", [1]],
        "env": [{"NCCL_DEBUG": "WARN"}, {"WANDB_API_KEY": ""}, {"A=B": "x"}, {"": "x"}, {"X": "a\nb"}, {"X": 1},
                {"X": None}, {"SKYPILOT_X": "1"}, {"LAUNCHER_RUN": "x"}, {"1X": "x"}, {"X": ["a"]}],
        "python": ["python3", "", " ", "/usr/bin/python3 -u", "a\nb", "~/venv/bin/python"],
        "workdir": [box, f"{box}/missing", "", f"{box}/fifo"], "project_dir": ["~/sky_workdir", "", "~", "/abs", "a b"],
        "runs_dir": ["~/sky_runs", "", "a\nb", "~user/x"], "master_port": [29500, 0, 65536, "x"],
        "metadata_url": ["http://127.0.0.1:1", "ftp://x", "", "http://u:p@h"], "notice_hold_s": [600, 0, -1],
    }


RECIPE_OVERRIDES = ["parallel.nodes=1", "parallel.nodes=2", "parallel.procs_per_node=1", "parallel.procs_per_node=2",
                    "checkpoint.uri=s3://b/p", "checkpoint.uri=s3://u:p@b/p", "parallel.strategy=fsdp",
                    "trainer.max_steps=2"]


def _write_cluster(box: Path, doc: dict[str, Any]) -> str:
    path = box / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return str(path)


@FUZZ
@given(data=st.data())
def test_any_vms_section(box: Path, data: st.DataObject) -> None:
    section = data.draw(_section(_vms_fitting(str(box)), str(box), ("hosts", "hosts_command")))
    cluster = _write_cluster(box, {"backend": "vms", "runs_dir": "runs", "vms": section})
    command = data.draw(st.sampled_from([["launch", "digits"], ["launch", "digits"], ["run", "s.py"],
                                         ["show", "digits"], ["sweep", "digits", "--grid", "optim.lr=0.1,0.2"]]))
    overrides = data.draw(st.lists(st.sampled_from(RECIPE_OVERRIDES), max_size=3))
    _ends_cleanly([*command, *overrides, "--cluster", cluster, "--runs-dir", f"{box}/runs"], box, [box / "runs"])


@FUZZ
@given(data=st.data())
def test_any_skypilot_section(box: Path, data: st.DataObject) -> None:
    section = data.draw(_section(_skypilot_fitting(str(box)), str(box)))
    cluster = _write_cluster(box, {"runs_dir": "runs", "skypilot": section})
    overrides = data.draw(st.lists(st.sampled_from(RECIPE_OVERRIDES), max_size=3))
    options = data.draw(st.lists(st.sampled_from([["--run-name", "r1"], ["--run-name", "a" * 300],
                                                   ["--out", f"{box}/task.yaml"], ["--out", f"{box}/task.yaml"],
                                                   ["--out", f"{box}/folder"], ["--out", f"{box}/fifo"],
                                                   ["--out", "/proc/x.yaml"], ["--out", f"{box}/missing/t.yaml"],
                                                   ["--out", ""]]), max_size=2))
    argv = ["skypilot", "digits", *overrides, *sum(options, []), "--cluster", cluster]
    _ends_cleanly(argv, box, [box / "task.yaml"])
