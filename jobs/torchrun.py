"""torchrun (`torch.distributed.run`), ended without the interpreter's teardown.

    python -m jobs.torchrun TORCHRUN_ARGS...    # what `python -m torch.distributed.run` takes

torchrun's agent imports all of torch, and a Python process holding torch spends 0.5-1 s after its
work is done freeing modules and running garbage collection before it exits (measured on a 2-core
machine: 0.5-1.2 s, against 0.03 s with `os._exit`). That second sits between the ranks' end and the
launcher's return on every run. torchrun has nothing left to do once `main` has returned or raised: its
workers have exited (or were stopped by `close()`), the exit barrier has passed and the rendezvous is
shut down inside `main`. So this wrapper flushes and ends the process at once, with the exit status
Python would have given: 0, or 1 after printing the traceback of an exception (a failed rank's
`ChildFailedError`, a `SignalException` on SIGTERM). `SystemExit` (bad arguments) and Ctrl-C take
Python's own way out.
"""
from __future__ import annotations

import os
import sys


def main() -> None:
    from torch.distributed.run import main as torchrun_main

    sys.argv[0] = "torchrun"  # as torchrun's own usage and error messages name it
    try:
        torchrun_main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:  # noqa: BLE001 - printed and turned into status 1, as the interpreter would
        sys.excepthook(*sys.exc_info())
        _exit_now(1)
    _exit_now(0)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
