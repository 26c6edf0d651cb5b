"""`python -m launcher` (what `make launch` and the tests run): the CLI, ended quietly by a closed pipe."""
import signal
import sys

from launcher.cli import main

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `launcher logs RUN | head` ends without a traceback
sys.exit(main())
