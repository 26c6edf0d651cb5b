import signal
import sys

from launcher.cli import main

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
sys.exit(main())
