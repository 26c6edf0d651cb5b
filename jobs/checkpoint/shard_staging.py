"""The host copy of a rank's shard before DCP writes it: the part of a sharded async save that
training waits for.

The staged tree has the structure of the shard state (DCP plans from it): every DTensor is rebuilt
around a host copy of its local tensor with the same spec (mesh, placements, global shape), every
plain tensor is a host copy, containers are new, other leaves are copied. DCP writes a tensor's
values, not its storage, so the files are those a save of the live state would write.

The host buffers are allocated once and reused by every later save with the same shapes: allocating
hundreds of MB afresh costs page faults that take longer than the copy. They are pinned for CUDA
sources (the device-to-host copies are then asynchronous, on the copy engine, and are waited for
once). CPU sources are copied by `threads` threads (Tensor.copy_ releases the GIL), the tensors cut
into pieces and dealt largest first to the least loaded thread, so one big tensor does not leave
the other threads idle.

A buffer must not be rewritten while the previous save is still writing it: stage() refuses until
release() says DCP is done with the tree it returned (ShardedSaver waits for its save in flight).
"""
from __future__ import annotations

import copy
import heapq
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

MAX_THREADS = 8  # beyond this a host's memory bandwidth, not the threads, bounds a copy
MIN_PIECE_BYTES = 1 << 20  # smaller pieces cost more in Python than they balance
IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)

Path = tuple  # where a tensor sits in the state: its keys and indices from the root
Piece = tuple[Tensor, Tensor]  # (source, destination) of one copy_


def copy_threads(local_ranks: int, cpus: Optional[int] = None) -> int:
    """Copy threads per rank: the CPUs this process may run on, shared by the ranks of its machine."""
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(MAX_THREADS, cpus // max(1, local_ranks)))


def deal(pieces: list[Piece], threads: int, max_piece_bytes: int) -> list[list[Piece]]:
    """`pieces` cut to at most `max_piece_bytes` each (contiguous ones only: a strided copy stays
    whole), then dealt to `threads` lists, largest first to the least loaded (LPT scheduling)."""
    cut: list[Piece] = []
    for src, dst in pieces:
        nbytes = src.numel() * src.element_size()
        if nbytes <= max_piece_bytes or not src.is_contiguous():
            cut.append((src, dst))
            continue
        flat_src, flat_dst = src.view(-1), dst.view(-1)
        step = max(1, max_piece_bytes // src.element_size())
        cut += [(flat_src[i:i + step], flat_dst[i:i + step]) for i in range(0, src.numel(), step)]
    cut.sort(key=lambda p: p[0].numel() * p[0].element_size(), reverse=True)
    lists: list[list[Piece]] = [[] for _ in range(threads)]
    load = [(0, i) for i in range(threads)]
    for piece in cut:
        nbytes, i = heapq.heappop(load)
        lists[i].append(piece)
        heapq.heappush(load, (nbytes + piece[0].numel() * piece[0].element_size(), i))
    return lists


def _run(pieces: list[Piece]) -> None:
    for src, dst in pieces:
        dst.copy_(src)


class ShardStager:
    """One rank's host copies of its shard, kept across saves (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ckpt-copy") if self.threads > 1 \
            else None  # the calling thread copies too
        self._buffers: dict[Path, Tensor] = {}
        self._lent = False  # a staged tree is still being written

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A host copy of `state`, complete when this returns; its tensors live in this stager's
        buffers until release()."""
        if self._lent:
            raise RuntimeError("the shard's host buffers are still being written by the previous save: wait for "
                               "it (ShardedSaver.wait_idle) and release() them before staging the next")
        cpu: list[Piece] = []
        devices: set[torch.device] = set()
        seen: dict[tuple, Tensor] = {}  # tensors sharing memory (tied weights) stay shared
        used: dict[Path, Tensor] = {}

        def host(t: Tensor, path: Path) -> Tensor:
            identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                        t.dtype)
            if identity in seen:
                return seen[identity]
            buf = self._buffer(t, path)
            used[path] = seen[identity] = buf
            if t.numel() == 0:
                return buf
            if t.is_cuda:  # asynchronous, into pinned memory: enqueued now, waited for once below
                buf.copy_(t, non_blocking=True)
                devices.add(t.device)
            else:
                cpu.append((t, buf))
            return buf

        with torch.no_grad():
            tree = _rebuild(state, (), host)
            self._copy(cpu)
            for device in devices:
                torch.cuda.synchronize(device)
        self._buffers = used  # state that went away frees its buffers
        self._lent = True
        return tree

    def release(self) -> None:
        """DCP is done with the last staged tree: its buffers may be rewritten."""
        self._lent = False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._buffers = {}

    def _buffer(self, t: Tensor, path: Path) -> Tensor:
        """This path's buffer from the last save if it still fits `t`, else a new one."""
        pin = t.is_cuda
        buf = self._buffers.get(path)
        # the strides clone() would give (a transposed tensor keeps its own): DCP writes them, and the
        # files stay those a save of the live state writes
        stride = torch.empty_like(t, device="meta").stride()
        if buf is None or buf.shape != t.shape or buf.stride() != stride or buf.dtype != t.dtype \
                or buf.is_pinned() != pin:
            buf = torch.empty_strided(t.shape, stride, dtype=t.dtype, device="cpu", pin_memory=pin)
        return buf

    def _copy(self, pieces: list[Piece]) -> None:
        if self._pool is None or not pieces:
            _run(pieces)
            return
        total = sum(src.numel() * src.element_size() for src, _ in pieces)
        # four pieces a thread: a thread slowed by the OS does not hold the others back for long
        mine, *theirs = deal(pieces, self.threads, max(MIN_PIECE_BYTES, total // (4 * self.threads)))
        futures = [self._pool.submit(_run, part) for part in theirs]
        _run(mine)
        for future in futures:
            future.result()


def _rebuild(obj: Any, path: Path, host: Any) -> Any:
    """`obj` with new containers and `host(tensor, path)` in place of every (local) tensor."""
    if isinstance(obj, DTensor):
        return DTensor(host(obj._local_tensor.detach(), path), obj._spec, requires_grad=False)
    if isinstance(obj, Tensor):
        return host(obj.detach(), path)
    if isinstance(obj, IMMUTABLE):
        return obj
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _rebuild(v, (*path, k), host)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_rebuild(v, (*path, i), host) for i, v in enumerate(obj))
    return copy.deepcopy(obj)  # training may change it while DCP writes it
