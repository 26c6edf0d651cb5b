"""`python -m launcher` (what `make launch` and the tests run): the CLI, ended quietly by a closed pipe."""
import logging
import os
import signal
import sys
import threading

from launcher.cli import main


def _nothing_left_running() -> bool:
    """No thread but this one that the interpreter would wait for at exit."""
    return all(t is threading.main_thread() or t.daemon or not t.is_alive() for t in threading.enumerate())


signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `launcher logs RUN | head` ends without a traceback
code = main()
if "torch" in sys.modules and isinstance(code, int) and _nothing_left_running():
    # A command that imported torch (export, doctor, a pipeline's layout check, a recipe naming user code)
    # would spend about a second more at exit freeing torch's modules (measured: 0.8-1.1 s on 2 cores).
    # The command is done and has written everything; only our own streams need flushing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
