"""Tier 1: commands that read a run directory (status, logs, cancel, doctor, plot) against damaged files:
truncated, nested 200k deep, binary, huge, a FIFO, a symlink to /dev/zero, to a folder or to nothing. Each
ends with exit 0, or exit 2 and one `error:` line (an optional HINT line under it); never a traceback, never a
hang, nothing created in the run directory. The CLI runs in-process (no new process per case); a FIFO
or /dev/zero that blocked a reader would fail the case through an alarm instead of hanging the suite."""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main

TIME_LIMIT_S = 10  # a reader that takes longer is hanging (each case takes milliseconds)
MEMORY_HEADROOM = 1 << 30  # a reader needs a few MiB: one that wants a GiB more is reading without end
DAMAGE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GOOD_RUN = {"run_name": "r", "backend": "local", "state": "completed", "launches": 1}
GOOD_RESULT = {"outcome": "completed", "step": 10, "val/acc": 0.9}
GOOD_METRICS = '{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5, "val/loss": 1.7}\n'


class Hang(Exception):
    """A command ran past TIME_LIMIT_S."""


@dataclass
class Outcome:
    code: Any
    out: str
    err: str


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"a command ran over {TIME_LIMIT_S} s")


def cli(*argv: str) -> Outcome:
    """`launcher ARGV` in this process: its exit code (or SystemExit's code), stdout and stderr. An
    exception other than SystemExit propagates: that is the traceback a user would see."""
    out, err = io.StringIO(), io.StringIO()
    with _bounded():
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: Any = main(list(argv))
            except SystemExit as exit_:
                code = exit_.code
    return Outcome(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    """A regression fails the case instead of hanging or exhausting the machine: an alarm interrupts a
    blocked open() of a FIFO; reading /dev/zero never blocks (no signal is seen), so the address space
    gets MEMORY_HEADROOM more than now and that read ends in a MemoryError."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    limits = resource.getrlimit(resource.RLIMIT_AS)
    used = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:")).split()[1]) << 10
    cap = used + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap if limits[1] == resource.RLIM_INFINITY else min(cap, limits[1]),
                                            limits[1]))
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.signal(signal.SIGALRM, previous)


def assert_clean(result: Outcome, codes: tuple = (0, 2)) -> None:
    """Exit 0 (or another code in `codes`), or exit 2 with one error line; no traceback either way."""
    assert result.code in codes, result
    assert "Traceback" not in result.out + result.err, result
    if result.code == 2:
        lines = result.err.splitlines()
        assert lines and lines[0].startswith("error: "), result
        assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  HINT: ")), result


def tree(root: Path) -> set[str]:
    """Every path under `root`, symlinks not followed (a link to / is one entry)."""
    return {str(p.relative_to(root)) for p in _walk(root)}


def _walk(folder: Path) -> Iterator[Path]:
    for entry in os.scandir(folder):
        yield Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))


def make_run(root: Path, files: dict[str, Any], name: str = "r") -> Path:
    """A run folder by hand: each value is bytes or text (written), "FIFO", or "->TARGET" (a symlink)."""
    run = root / name
    (run / "logs").mkdir(parents=True, exist_ok=True)
    for rel, content in {"run.json": json.dumps(GOOD_RUN), **files}.items():
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "FIFO":
            os.mkfifo(path)
        elif content.startswith("->"):
            path.symlink_to(content[2:])
        else:
            path.write_text(content)
    return run


def reader(command: str, root: Path, out: Path) -> tuple[str, ...]:
    extra = ("--out", str(out)) if command == "plot" else ()
    return (command, "r", "--cluster", "local", "--runs-dir", str(root), *extra)


# ----------------------------------------------------------------------------- each damage, named (issue 23)
NESTED = b"[" * 200_000


@pytest.mark.parametrize("command", ["status", "logs", "cancel", "doctor"])
def test_run_json_and_result_json_nested_200k_deep(tmp_path: Path, command: str) -> None:
    run = make_run(tmp_path, {"run.json": NESTED, "result.json": b'{"a":' * 200_000, "logs/rank0.log": "hello\n"})
    result = cli(*reader(command, tmp_path, tmp_path / "x.png"))
    assert_clean(result)
    if command == "status":  # said, not silently taken for an empty record
        assert "run.json unreadable: JSON nested over" in result.out, result
        assert "result.json unreadable" in result.out, result
    if command == "doctor":
        assert "NOTE: run.json unreadable: JSON nested over 64 deep: not read" in result.out, result
    assert tree(tmp_path) == {"r", "r/logs", "r/logs/rank0.log", "r/run.json", "r/result.json"}
    assert run.exists()


@pytest.mark.parametrize("log", ["FIFO", "->/dev/zero", "->/", "->nowhere"])
def test_doctor_and_logs_never_read_a_log_that_is_no_regular_file(tmp_path: Path, log: str) -> None:
    make_run(tmp_path, {"logs/rank0.log": log})
    doctor = cli(*reader("doctor", tmp_path, tmp_path))
    assert_clean(doctor)
    logs = cli(*reader("logs", tmp_path, tmp_path))
    assert_clean(logs)
    if log == "->nowhere":
        assert "no log for rank 0" in logs.err
        return
    kind = {"FIFO": "a FIFO", "->/dev/zero": "a character device", "->/": "a folder"}[log]
    assert f"NOTE: logs/rank0.log: not a regular file ({kind}): not read, so not diagnosed" in doctor.out, doctor
    assert logs.code == 2 and f"cannot be read: not a regular file ({kind})" in logs.err, logs


def test_plot_skips_numbers_too_large_for_a_float_and_lines_nested_too_deep(tmp_path: Path) -> None:
    metrics = ('{"step": 3, "train/loss": 1' + "0" * 400 + '}\n').encode() + NESTED + b"\n" + GOOD_METRICS.encode()
    make_run(tmp_path, {"metrics.jsonl": metrics})
    result = cli(*reader("plot", tmp_path, tmp_path / "curves.png"))
    assert_clean(result, codes=(0,))
    assert "wrote" in result.out and (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("out,said", [("folder.png", "is a folder"), ("/proc/x.png", "cannot be written")])
def test_plot_out_a_folder_or_an_unwritable_path(tmp_path: Path, out: str, said: str) -> None:
    make_run(tmp_path, {"metrics.jsonl": GOOD_METRICS})
    (tmp_path / "folder.png").mkdir()
    before = tree(tmp_path)
    result = cli(*reader("plot", tmp_path, tmp_path / out))
    assert_clean(result)
    assert result.code == 2 and said in result.err, result
    assert tree(tmp_path) == before


def test_doctor_cluster_with_an_unknown_storage_profile_is_a_failed_check(tmp_path: Path) -> None:
    cluster = tmp_path / "prof.yaml"
    cluster.write_text(f"backend: local\nruns_dir: {tmp_path}\nstorage:\n  endpoint_url: http://127.0.0.1:9\n"
                       "  profile: nope\n")
    result = cli("doctor", "--cluster", str(cluster))
    assert_clean(result, codes=(1,))
    assert "FAIL checkpoint store:" in result.out and "storage.profile 'nope' cannot be used" in result.out, result


def test_more_local_ranks_than_the_machine_can_run_are_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.backends import local

    def refuse(*args: Any, **kwargs: Any) -> None:  # a regression must fail here, not start 100000 processes
        raise AssertionError(f"started a process: {args[0] if args else kwargs}")

    monkeypatch.setattr(local.subprocess, "Popen", refuse)
    monkeypatch.delenv(local.MAX_RANKS_ENV, raising=False)
    (tmp_path / "s.py").write_text("print('ran')\n")
    monkeypatch.chdir(tmp_path)
    result = cli("run", "s.py", "--procs-per-node", "100000", "--runs-dir", str(tmp_path / "runs"))
    assert_clean(result)
    assert result.code == 2 and "parallel.procs_per_node=100000: more ranks than this machine can run" in result.err
    assert "LAUNCHER_MAX_LOCAL_RANKS=100000" in result.err and "CPUs" in result.err, result
    assert not (tmp_path / "runs").exists()
    cpus = len(os.sched_getaffinity(0))
    assert local.local_ranks_limit() == max(8, 4 * cpus)  # a 4-rank test on a 2-core machine still runs
    monkeypatch.setenv(local.MAX_RANKS_ENV, "100000")  # the user's own word for it
    assert local.local_ranks_limit() == 100000


# ----------------------------------------------------------------------------- the property
RUN_FILES = ["run.json", "result.json", "metrics.jsonl", "batch.json", "logs/rank0.log", "logs/rank1.log",
             "config.yaml"]
LINKS = ["->/dev/zero", "->/", "->nowhere", "->.", "->run.json"]


def _good(name: str) -> bytes:
    good = {"run.json": json.dumps(GOOD_RUN), "result.json": json.dumps(GOOD_RESULT), "metrics.jsonl": GOOD_METRICS,
            "batch.json": '{"micro": 8, "accum": 2}'}.get(name, "launcher: rank 0 of 1 on h\nINFO jobs.train: hi\n")
    return good.encode()


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                      | st.sampled_from([10**400, -(2**63), 2**64]),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=8)
# fields the readers look at, with wrong types and odd values; never a real pid or a Slurm/VM backend (cancel
# would signal it or reach it)
fields = st.dictionaries(st.sampled_from(["run_name", "state", "exit_code", "launches", "requeues", "failed_rank",
                                          "attempt", "outcome", "step", "signal", "metrics", "job_id", "extra"]),
                         values, max_size=4)


@st.composite
def damaged(draw: Callable) -> tuple[str, Any]:
    """One run file, damaged one way."""
    name = draw(st.sampled_from(RUN_FILES))
    good = _good(name)
    how = draw(st.sampled_from(["truncated", "nested", "binary", "huge", "FIFO", "link", "typed", "lines"]))
    if how == "truncated":
        return name, good[:draw(st.integers(0, len(good) - 1))]
    if how == "nested":
        depth = draw(st.sampled_from([65, 1000, 200_000]))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"step": 1, "x": [']))
        return name, opener * depth + draw(st.sampled_from([b"", b"]" * depth]))
    if how == "binary":
        return name, draw(st.binary(max_size=64)) + draw(st.sampled_from([b"", b"\xff\xfe\x00", good]))
    if how == "huge":
        # just over each reader's cap: 4 MiB for a record, 8 MiB read from a log's end
        return name, b'{"a": "' + b"x" * (4 << 20) + b'"}' if name.endswith("json") else b"x\n" * (9 << 19)
    if how == "link":
        return name, draw(st.sampled_from(LINKS))
    if how == "typed":
        return name, json.dumps({**json.loads(good), **draw(fields)} if name.endswith(".json") and
                                name != "config.yaml" else draw(values), default=str).encode()
    if how == "lines":  # metrics.jsonl and logs: good lines among bad ones
        return name, b"\n".join(draw(st.lists(st.sampled_from([
            good, b'{"step": 1, "train/loss": 1' + b"0" * 400 + b"}", b'{"step": 1e999, "a": 1}',
            b'{"step": 2, "val/loss": NaN}', b"[" * 5000, b"\x00\x1b[2J", b'{"step": true, "a": -Infinity}']),
            min_size=1, max_size=4)))
    return name, "FIFO"


def _reads_cleanly(root: Path, command: str, files: list[tuple[str, Any]]) -> None:
    make_run(root, dict(files))
    before = tree(root)
    result = cli(*reader(command, root, root.parent / f"{root.name}.png"))
    assert_clean(result, codes=(0, 1, 2) if command == "doctor" else (0, 2))  # doctor: 1 = it found a failure
    assert tree(root) == before


# a few hundred cases where a case takes milliseconds, fewer where it draws a figure or runs every rule
some_files = st.lists(damaged(), min_size=1, max_size=3, unique_by=lambda f: f[0])


@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
@given(files=some_files)
@settings(DAMAGE, max_examples=200)
def test_status_logs_cancel_of_damaged_run_files_end_cleanly(tmp_path_factory: pytest.TempPathFactory, command: str,
                                                             files: list[tuple[str, Any]]) -> None:
    _reads_cleanly(tmp_path_factory.mktemp("runs"), command, files)


@given(files=some_files)
@settings(DAMAGE, max_examples=80)
def test_doctor_of_damaged_run_files_ends_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                                  files: list[tuple[str, Any]]) -> None:
    _reads_cleanly(tmp_path_factory.mktemp("runs"), "doctor", files)


@given(files=some_files)
@settings(DAMAGE, max_examples=50)
def test_plot_of_damaged_run_files_ends_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                                files: list[tuple[str, Any]]) -> None:
    _reads_cleanly(tmp_path_factory.mktemp("runs"), "plot", files)
