"""torchrun (`torch.distributed.run`), ended without the interpreter's teardown.

    python -m jobs.torchrun TORCHRUN_ARGS...    # what `python -m torch.distributed.run` takes

torchrun's agent imports all of torch, and a Python process holding torch spends 0.5-1 s after its
work is done freeing modules and running garbage collection before it exits (measured on a 2-core
machine: 0.5-1.2 s, against 0.03 s with `os._exit`). That second sits between the ranks' end and the
launcher's return on every run. torchrun has nothing left to do once `main` has returned or raised: its
workers have exited (or were stopped by `close()`), the exit barrier has passed and the rendezvous is
shut down inside `main`. So this wrapper flushes and ends the process at once.

Its exit status says how the ranks ended, as a shell would (torchrun itself exits 1 whatever happened):
- 0 when every rank exited 0;
- a failed rank's own status (the first failure torchrun observed): its exit code, or 128 + N for a
  rank killed by signal N (a SIGKILLed rank: 137). torchrun's failure table is printed, not the
  agent's traceback;
- 128 + N when torchrun itself was told to stop by signal N (`launcher cancel`, Ctrl-C): the ranks
  got it as SIGTERM and stopped; nothing is printed, torchrun's internals are of no use on a stop.
Any other exception is printed and gives 1, as the interpreter would. `SystemExit` (bad arguments) and
Ctrl-C before the agent runs take Python's own way out.
"""
from __future__ import annotations

import logging
import os
import sys

# torchrun's agent and process modules: on a stop they log each signal they send as a warning; their
# errors (a rank that failed, with its exit code) still show
QUIET_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    sys.argv[0] = "torchrun"  # as torchrun's own usage and error messages name it
    for name in QUIET_LOGGERS:  # their warnings narrate a stop ("death signal", "closing signal SIGTERM")
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        torchrun_main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except SignalException as err:  # told to stop: the ranks were stopped with it, quietly
        _exit_now(128 + int(err.sigval))
    except ChildFailedError as err:
        print(err.format_msg().rstrip(), file=sys.stderr)  # torchrun's table: which rank, which code
        _exit_now(failure_status(err.get_first_failure()[1].exitcode))
    except BaseException:  # noqa: BLE001 - printed and turned into status 1, as the interpreter would
        sys.excepthook(*sys.exc_info())
        _exit_now(1)
    _exit_now(0)


def failure_status(exitcode: int) -> int:
    """A rank's status as a shell reports it: its exit code, 128 + N if signal N killed it; never 0."""
    return 128 - exitcode if exitcode < 0 else exitcode or 1


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
