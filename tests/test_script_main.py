"""jobs/script_main.py runs a `launcher run` script as `python` would and ends its process without the
interpreter's teardown (where DDP's gloo threads can abort a script that has finished). Real processes,
each compared with plain `python` running the same script."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.script import SCRIPT_MAIN

SCRIPT = '''\
import atexit, os, sys, threading, time
import helper  # a module beside the script: the script's folder is first on sys.path
print("seen", __name__, sys.argv, os.path.basename(__file__), sys.path[0] == os.path.dirname(os.path.abspath(__file__)),
      helper.X, flush=True)
log = open(os.path.join(os.path.dirname(__file__), "unclosed.txt"), "w")
log.write("written, never closed")  # buffered: only the exit's flush writes it

def late():
    time.sleep(0.3)
    print("thread joined", flush=True)

threading.Thread(target=late).start()  # not a daemon: Python waits for it before atexit
atexit.register(lambda: print("atexit ran", flush=True))
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    def inner():
        raise ValueError("boom")
    inner()
if mode == "interrupt":
    raise KeyboardInterrupt
if mode == "teardown":
    class AbortsAtTeardown:  # stands in for gloo's threads, which can abort during finalization
        def __del__(self):
            os.abort()
    keep = AbortsAtTeardown()
'''


@pytest.fixture
def script(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "helper.py").write_text("X = 42\n")
    (folder / "train.py").write_text(SCRIPT)
    return folder / "train.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-u", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode, code", [("ok", 0), ("exit3", 3), ("message", 1), ("raise", 1)])
def test_runs_the_script_as_python_does(script: Path, tmp_path: Path, mode: str, code: int) -> None:
    outputs = []
    for command in (["code/train.py", mode], [SCRIPT_MAIN, "code/train.py", mode]):
        (script.parent / "unclosed.txt").unlink(missing_ok=True)
        done = _run(*command, cwd=tmp_path)
        assert done.returncode == code, done.stdout + done.stderr
        assert (script.parent / "unclosed.txt").read_text() == "written, never closed"
        outputs.append((done.stdout, done.stderr))
    (python_out, python_err), (ours_out, ours_err) = outputs
    assert ours_out == python_out, (ours_out, python_out)
    assert "seen __main__ ['code/train.py', '" + mode + "'] train.py True 42" in ours_out
    assert ours_out.endswith("thread joined\natexit ran\n"), ours_out
    assert ours_err == python_err, (ours_err, python_err)  # the traceback too: from the script's first frame


def test_a_finished_script_is_not_aborted_by_the_interpreters_teardown(script: Path, tmp_path: Path) -> None:
    plain = _run("code/train.py", "teardown", cwd=tmp_path)
    assert plain.returncode == -signal.SIGABRT  # what gloo's threads do to a finished DDP script, sometimes
    ours = _run(SCRIPT_MAIN, "code/train.py", "teardown", cwd=tmp_path)
    assert ours.returncode == 0 and ours.stdout.endswith("thread joined\natexit ran\n"), ours.stdout + ours.stderr


def test_ctrl_c_ends_the_process_by_sigint_as_python_does(script: Path, tmp_path: Path) -> None:
    plain = _run("code/train.py", "interrupt", cwd=tmp_path)
    ours = _run(SCRIPT_MAIN, "code/train.py", "interrupt", cwd=tmp_path)
    assert plain.returncode == ours.returncode == -signal.SIGINT
    assert ours.stderr.rstrip().endswith("KeyboardInterrupt") and "atexit ran" in ours.stdout


def test_a_module_runs_with_the_working_directory_first_on_the_path(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text("import os, sys\nprint(__name__, sys.argv[1:], sys.path[0] == os.getcwd())\n")
    plain, ours = _run("-m", "pkg.main", "--x", cwd=tmp_path), _run(SCRIPT_MAIN, "-m", "pkg.main", "--x", cwd=tmp_path)
    assert ours.returncode == plain.returncode == 0 and ours.stdout == plain.stdout == "__main__ ['--x'] True\n"


def test_a_missing_script_exits_2_as_python_does(tmp_path: Path) -> None:
    plain, ours = _run("nosuch.py", cwd=tmp_path), _run(SCRIPT_MAIN, "nosuch.py", cwd=tmp_path)
    assert ours.returncode == plain.returncode == 2
    assert ours.stderr.endswith("can't open file " + repr(str(tmp_path / "nosuch.py")) +
                                ": [Errno 2] No such file or directory\n"), ours.stderr
