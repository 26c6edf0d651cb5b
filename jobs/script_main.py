"""The script's own process under `launcher run`: `python -u script_main.py (PATH | -m MODULE) ARGS...`
runs the user's script as `python PATH ARGS` (or `python -m MODULE ARGS`) would, and then ends the
process without the interpreter's teardown.

Why: a script that used DistributedDataParallel over gloo can abort after it has finished
("terminate called without an active exception", SIGABRT, exit 134). DDP keeps the gloo process
group alive past `destroy_process_group()` (its worker threads are still there afterwards), and
the threads race the interpreter's finalization (pytorch/pytorch#190489, PR #179291). Lightning,
which never destroys its group, hit it in one of three runs here: a completed run reported failed
and requeued. Our own trainer ends the same way (jobs.train.exit_cleanly).

What a script sees is what `python` gives it: `__name__ == "__main__"`, `sys.argv`, `__file__`,
the script's folder first on `sys.path` (the module's parent for -m), its own signal handlers. What a
normal exit does still happens, in Python's order: non-daemon threads are joined, atexit handlers run
(logging, wandb, multiprocessing's children), open files are flushed. Only then does the process end
with the script's exit code, without tearing the interpreter down. An uncaught exception prints its
traceback (from the script's own frames) and exits 1; Ctrl-C's KeyboardInterrupt ends the process
by SIGINT, as Python does.

Standard library only, and run by path, not `-m jobs...`: a user's own `jobs/` folder must not shadow it.
"""
from __future__ import annotations

import atexit
import builtins
import faulthandler
import gc
import importlib.machinery
import io
import os
import runpy
import sys
import threading
import types
from pathlib import Path
from types import TracebackType
from typing import Optional


def main(argv: list[str]) -> None:
    _register_stack_signal()
    module = argv[0] == "-m"
    target = argv[1] if module else argv[0]
    rest = argv[2:] if module else argv[1:]
    if not module and not os.path.exists(target):
        print(f"{sys.executable}: can't open file {os.path.abspath(target)!r}: [Errno 2] No such file or directory",
              file=sys.stderr)
        os._exit(2)  # as python does
    sys.argv = [target, *rest]  # as python sets it: the path as given
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(target))  # this file's folder out
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif os.path.isfile(target):
            _run_file(target)
        else:  # a folder or zip file with a __main__.py
            runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except KeyboardInterrupt:
        raise  # Python reports it and ends the process by SIGINT: left to Python
    except BaseException as error:  # noqa: BLE001 - reported as Python would, then exit 1
        error.__traceback__ = _from_the_script(error.__traceback__)  # what the default hook prints
        sys.excepthook(type(error), error, error.__traceback__)
        code = 1
    _finish_as_python_does()
    os._exit(code)


_STACK_FILES: list = []  # faulthandler writes to these until the process ends


def _register_stack_signal() -> None:
    """Every thread's stack to the rank's stack file on the signal `launcher stacks` sends where py-spy cannot
    read the process (jobs.stacks: the file and signal come from the rank wrapper's environment; this file
    imports none of ours, so a user's own `jobs/` cannot shadow them)."""
    path, signum = os.environ.get("LAUNCHER_STACK_FILE"), os.environ.get("LAUNCHER_STACK_SIGNAL", "")
    if not path or not signum.isdigit():
        return
    try:
        out = open(path, "a")  # noqa: SIM115 - open for the life of the process
        faulthandler.register(int(signum), file=out, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError):  # a stack file that cannot be written: no dumps, the script runs
        return
    _STACK_FILES.append(out)


def _run_file(path: str) -> None:
    """As `python path` runs it: in a fresh `__main__` module whose `__file__` is the absolute path
    (sys.argv[0] stays as given), compiled from bytes so its encoding declaration holds."""
    source = Path(path).absolute()
    script = types.ModuleType("__main__")
    script.__file__ = str(source)
    script.__builtins__ = builtins
    script.__loader__ = importlib.machinery.SourceFileLoader("__main__", str(source))
    sys.modules["__main__"] = script  # pickles of its classes (multiprocessing's spawn) find it there
    with io.open_code(str(source)) as file:
        code = compile(file.read(), str(source), "exec", dont_inherit=True)
    exec(code, script.__dict__)


def _exit_status(code: object) -> int:
    """What `sys.exit(code)` makes the exit status: None -> 0, an int as it is, anything else printed -> 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _from_the_script(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The traceback from the script's first frame on: this file's and runpy's frames left out."""
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None and tb.tb_next is not None and _file_of(tb) in ours:
        tb = tb.tb_next
    return tb


def _file_of(tb: TracebackType) -> str:
    name = tb.tb_frame.f_code.co_filename
    return name if name.startswith("<") else os.path.abspath(name)


_WRITERS = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)  # what holds unwritten bytes


def _finish_as_python_does() -> None:
    """What Python does at exit before finalization: join non-daemon threads, run atexit handlers;
    then flush what finalization would have flushed (files the script left open, stdout, stderr)."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for obj in gc.get_objects():
        # type(), not isinstance(): an ABC check reads obj.__class__, which some objects warn about
        if issubclass(type(obj), _WRITERS):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:  # noqa: BLE001 - a file that cannot be flushed would not be at exit either
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] == "-m" and len(sys.argv) < 3:
        sys.exit("usage: script_main.py (PATH | -m MODULE) [ARGS...]")
    main(sys.argv[1:])
