"""Reading Python stack dumps (py-spy's `dump` and faulthandler's formats) and the report that groups ranks
by identical stacks: `ranks 0,2,3: dist.all_reduce at trainer.py:274` (what `launcher stacks` prints; the
doctor's hang rule reads the same frames). Standard library only, torch-free.

A dump is kept as the tool wrote it, plus a `Source lines:` block that `add_source` appends where the code is
(the rank's node): the line each user frame is at, so the report can name the call (`time.sleep`) even on a
machine without the user's files.
"""
from __future__ import annotations

import linecache
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Optional

SOURCE_HEADER = "Source lines:"
# py-spy: `Thread 0x7F... (idle): "MainThread"` / `    <module> (/path/x.py:12)`
PY_SPY_THREAD = re.compile(r'^Thread (\S+) \(([^)]*)\)(?:: "(.*)")?\s*$')
PY_SPY_FRAME = re.compile(r"^\s+(.+?) \((.+):(\d+)\)\s*$")
# faulthandler: `Current thread 0x... (most recent call first):` / `  File "/path/x.py", line 12 in <module>`
FAULT_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)|^Stack \(most recent call first\)")
FAULT_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+?)\s*$')
SOURCE_LINE = re.compile(r"^\s+(.+):(\d+): (.*)$")
CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
# Code that is not the user's: the standard library, installed packages, the interpreter's frozen modules
WRAPPER = re.compile(r"/jobs/script_main\.py$")
LIBRARY = re.compile(r"site-packages|dist-packages|/lib/python3[\d.]*/|^<|/jobs/script_main\.py$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.function} ({self.file}:{self.line})"

    @property
    def user(self) -> bool:
        return not LIBRARY.search(self.file)


@dataclass(frozen=True)
class Thread:
    name: str
    frames: tuple[Frame, ...]  # innermost first, as both tools print them


@dataclass(frozen=True)
class Stack:
    """One rank's dump, parsed; `note` is the first line where there is no stack (a process that ended)."""

    threads: tuple[Thread, ...]
    source: dict  # (file, line) -> the line's text
    note: str = ""

    @property
    def main(self) -> Optional[Thread]:
        """The main thread: py-spy names it; faulthandler lists the oldest thread, the main one, last."""
        named = [t for t in self.threads if t.name == "MainThread"]
        return named[0] if named else (self.threads[-1] if self.threads else None)

    def label(self) -> str:
        """`call at file:line` of the main thread's innermost user frame (or the innermost frame)."""
        main = self.main
        if main is None or not main.frames:
            return self.note or "no stack"
        frames = main.frames
        at = next((i for i, f in enumerate(frames) if f.user), 0)
        where = frames[at]
        code = self.source.get((where.file, where.line), "")  # never read here: the file may be on a dead mount
        name = _called(CALL.findall(code), frames[:at]) or (frames[0].function if at else where.function)
        return f"{name} at {PurePath(where.file).name}:{where.line}"


def _called(calls: list[str], inside: tuple[Frame, ...]) -> str:
    """Which call of a line runs now: the one a frame inside it is named after (`scaler.scale(loss).backward()`
    inside `Tensor.backward`: backward), else the line's first (`time.sleep(n)`: a C function has no frame)."""
    names = {frame.function.rsplit(".", 1)[-1] for frame in inside}
    return next((call for call in calls if call.rsplit(".", 1)[-1] in names), calls[0] if calls else "")


def parse(text: str) -> Stack:
    threads: list[Thread] = []
    name, frames, source = None, [], {}
    in_source = False
    for line in text.splitlines():
        if line.strip() == SOURCE_HEADER:
            in_source = True
            continue
        if in_source:
            if m := SOURCE_LINE.match(line):
                source[(m.group(1), int(m.group(2)))] = m.group(3).strip()
            continue
        thread = PY_SPY_THREAD.match(line) or FAULT_THREAD.match(line)
        if thread:
            if name is not None:
                threads.append(Thread(name, tuple(frames)))
            name, frames = (thread.group(3) or thread.group(1) or "") if thread.re is PY_SPY_THREAD else \
                (thread.group(1) or ""), []
            continue
        if m := PY_SPY_FRAME.match(line):
            frames.append(Frame(m.group(1), m.group(2), int(m.group(3))))
        elif m := FAULT_FRAME.match(line):
            frames.append(Frame(m.group(3), m.group(1), int(m.group(2))))
    if name is not None:
        threads.append(Thread(name, tuple(frames)))
    note = "" if threads else next((ln.strip() for ln in text.splitlines() if ln.strip()), "no stack")
    return Stack(tuple(threads), source, note)


def add_source(text: str) -> str:
    """`text` with a Source lines: block for the user frames of the main thread (read on the rank's host)."""
    stack = parse(text)
    if stack.main is None or SOURCE_HEADER in text:
        return text
    lines = []
    for frame in stack.main.frames:
        code = linecache.getline(frame.file, frame.line).strip() if frame.user else ""
        if code:
            lines.append(f"  {frame.file}:{frame.line}: {code}")
    return text if not lines else text.rstrip("\n") + f"\n\n{SOURCE_HEADER}\n" + "\n".join(lines) + "\n"


def ranks_named(ranks: list[int]) -> str:
    """`rank 1`, `ranks 0,2,3`, `ranks 0-63,65`: runs of three or more as ranges (a thousand ranks fit a line)."""
    parts, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts += [f"{ranks[i]}-{ranks[j]}"] if j - i >= 2 else [str(r) for r in ranks[i:j + 1]]
        i = j + 1
    return f"{'ranks' if len(ranks) > 1 else 'rank'} {','.join(parts)}"


def grouped(stacks: dict[int, str]) -> list[tuple[list[int], Stack]]:
    """Ranks whose main threads stand at the same frames, together: (ranks, one of their stacks), the
    largest group first."""
    groups: dict[object, tuple[list[int], Stack]] = {}
    for rank, text in sorted(stacks.items()):
        stack = parse(text)
        key = stack.main.frames if stack.main is not None else stack.note
        groups.setdefault(key, ([], stack))[0].append(rank)
    return sorted(groups.values(), key=lambda g: (-len(g[0]), g[0][0]))


def group(stacks: dict[int, str]) -> str:
    """The report: one line per group of identical stacks, then that group's main-thread stack, indented."""
    out = []
    for ranks, stack in grouped(stacks):
        out.append(f"{ranks_named(ranks)}: {stack.label()}")
        main = stack.main
        if main is not None:  # `launcher run`'s wrapper frames (script_main) left out: the same in every script
            out += [f"    {frame}" for frame in main.frames if not WRAPPER.search(frame.file)]
            others = len(stack.threads) - 1
            if others:
                out.append(f"    (+{others} other thread{'s' if others > 1 else ''}: see the dump files)")
    return "\n".join(out) + "\n"
