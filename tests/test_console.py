"""Tier 2: what a person at a terminal sees. The real CLI runs on a pseudo-terminal (so rank 0
draws its progress bar), and the captured output is replayed as a terminal shows it."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "12/20 [00:01<00:00, ...]"


def run_on_terminal(args: list[str], timeout: float = 300) -> str:
    """Everything the command wrote to its terminal (stdout and stderr are the same tty)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def as_displayed(raw: str) -> list[str]:
    """The lines a terminal shows: a carriage return moves back to column 0 and later text overwrites."""
    lines = []
    for line in raw.split("\n"):
        cells: list[str] = []
        column = 0
        for char in line:
            if char == "\r":
                column = 0
                continue
            if column < len(cells):
                cells[column] = char
            else:
                cells.append(char)
            column += 1
        lines.append("".join(cells).rstrip())
    return lines


def test_log_lines_never_cut_the_progress_bar(runs_dir: Path) -> None:
    overrides = ["trainer.max_steps=16", "trainer.eval_every=4", "checkpoint.every_steps=4",
                 "logging.progress_bar=true"]
    raw = run_on_terminal(["launch", "digits", *overrides, "--run-name", "tty", "--runs-dir", str(runs_dir)])
    shown = as_displayed(raw)
    assert any(BAR.search(line) for line in shown), raw  # rank 0 saw a terminal and drew its bar
    evals = [line for line in shown if "[rank0]" in line and "val/loss" in line]
    assert len(evals) >= 4, raw  # the log lines logged while the bar was on screen are shown...
    glued = [line for line in shown if "[rank0]" in line and BAR.search(line)]
    assert not glued, glued  # ...each on a line of its own

    log = (runs_dir / "tty" / "logs" / "rank0.log").read_text()
    assert "checkpoint step 8 committed to" in log  # per-save detail is in the log file...
    assert "committed to" not in raw and "training blocked" not in raw  # ...not on the console
