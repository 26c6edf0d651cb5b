"""Text present offline on every machine: the Python standard library's own source files, as byte
tokens (vocabulary 256) for a language model (`data.target: jobs.text:python_sources`).

The train/validation split is by file (no file contributes to both), decided by a hash of each file's
path relative to the standard library's folder and `seed`; files are read in an order drawn the same way
until `max_bytes` are taken, so a run reads a few MB however large the library is, and the selection is
spread over the whole library instead of its first folders. The same Python version gives the same bytes
on every machine: the file list is sorted, and what depends on the installation is left out
(`site-packages`, and `test/`, which some distributions ship as a separate package).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

EXCLUDED_TOP = frozenset({"site-packages", "dist-packages", "test", "__pycache__"})


class ByteWindows(Dataset):
    """Fixed windows over a byte stream: sample i is bytes [i*T, i*T + T + 1), as (input, target) = (its
    first T bytes, its last T) of int64 token ids. Windows overlap by one byte so each byte after the first
    is a target exactly once."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if len(data) < seq_len + 1:
            raise ValueError(f"{len(data)} bytes hold no window of seq_len + 1 = {seq_len + 1}: raise max_bytes")
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.seq_len
        chunk = self.data[start:start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


@dataclass(frozen=True)
class Corpus:
    """The bytes of each split and the files they came from (relative paths, in reading order)."""

    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def python_sources(seq_len: int = 128, max_bytes: int = 2_000_000, val_fraction: float = 0.1, seed: int = 0,
                   root: Optional[str] = None) -> tuple[ByteWindows, ByteWindows]:
    """(train, validation) windows of `seq_len` + 1 bytes over at most `max_bytes` of the standard library's
    `.py` files (`root`: another folder of `.py` files instead), about `val_fraction` of them held out."""
    if seq_len < 1 or max_bytes < 2 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"python_sources needs seq_len >= 1, max_bytes >= 2 and 0 < val_fraction < 1; got "
                         f"seq_len={seq_len}, max_bytes={max_bytes}, val_fraction={val_fraction}")
    folder = str(Path(root or stdlib_folder()).resolve())
    corpus = read_corpus(folder, max_bytes, val_fraction, seed)
    for split, data in (("train", corpus.train), ("validation", corpus.val)):
        if len(data) < seq_len + 1:
            raise ValueError(f"the {split} split of {folder} has {len(data)} bytes, less than one window of "
                             f"seq_len + 1 = {seq_len + 1}: raise max_bytes or val_fraction, or add files")
    return ByteWindows(corpus.train, seq_len), ByteWindows(corpus.val, seq_len)


def stdlib_folder() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=4)
def read_corpus(root: str, max_bytes: int, val_fraction: float, seed: int) -> Corpus:
    """The corpus, read once per process and argument set (the trainer builds its data sets once, tests
    and tools may ask again)."""
    files = source_files(Path(root))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    val_budget = max(1, round(max_bytes * val_fraction))
    budgets = {"train": max_bytes - val_budget, "val": val_budget}
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    for rel in sorted(files, key=lambda r: _unit_hash("order", seed, r)):
        if budgets["train"] <= 0 and budgets["val"] <= 0:
            break
        split = "val" if _unit_hash("split", seed, rel) < val_fraction else "train"
        if budgets[split] <= 0:
            continue
        text = (Path(root) / rel).read_bytes()[:budgets[split]]  # the last file of a split is cut to fit
        parts[split].append(text)
        names[split].append(rel)
        budgets[split] -= len(text)
    return Corpus(_tensor(b"".join(parts["train"])), _tensor(b"".join(parts["val"])),
                  tuple(names["train"]), tuple(names["val"]))


def source_files(root: Path) -> list[str]:
    """Every `.py` file under `root` as a sorted relative POSIX path, installation-specific folders left
    out; symbolic links to folders are not followed (they may lead out of the library)."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder == Path("."):
            dirs[:] = [d for d in dirs if d not in EXCLUDED_TOP]
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [(rel_folder / f).as_posix() for f in files if f.endswith(".py")]
    return sorted(found)


def _unit_hash(purpose: str, seed: int, rel: str) -> float:
    """A number in [0, 1) fixed by the purpose, the seed and the relative path: the same on every
    machine and in every process (Python's own hash() is salted per process)."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
