"""The stop agreement on 2 real gloo processes: every rank acts on a stop at the same call; with short
steps one call after the request (asynchronous), with long steps at the request's own call (synchronous),
and a request made as the mode switches is not lost."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training import agreement as agreement_module
from jobs.training.agreement import SYNC_STEP_S, StopAgreement

pytestmark = pytest.mark.slow  # real processes


def _rank(rank: int, store: str, out: str, step_s: float, stop_at: dict[int, int], calls: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    agreement, seen = StopAgreement(), []
    for call in range(1, calls + 1):
        if rank == 1:
            time.sleep(step_s)  # rank 1 is the slow one: its step time decides for both
        stop, _ = agreement.exchange(stop_at.get(rank) == call, False)
        seen.append([call, stop, agreement.synchronous])
    agreement.drain()
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def run(tmp_path: Path, step_s: float, stop_at: dict[int, int], calls: int = 10) -> list[list]:
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path), step_s, stop_at, calls), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # the same answers at the same calls on every rank
    return ranks[0]


def stops(seen: list[list]) -> list[int]:
    return [call for call, stop, _ in seen if stop]


def test_short_steps_stay_asynchronous_and_act_one_call_later(tmp_path: Path) -> None:
    seen = run(tmp_path, step_s=0.0, stop_at={1: 6})
    assert not any(sync for _, _, sync in seen)
    assert stops(seen) == [7]


def test_long_steps_switch_to_synchronous_and_act_at_the_requests_call(tmp_path: Path) -> None:
    seen = run(tmp_path, step_s=SYNC_STEP_S + 0.05, stop_at={0: 7}, calls=8)
    switched = [call for call, _, sync in seen if sync]
    assert switched[0] == agreement_module.TIMED_CALLS + 1 and switched == list(range(switched[0], 9))
    assert stops(seen) == [7]  # requested on rank 0 at call 7, agreed at call 7 on both ranks


@pytest.mark.parametrize("at", [agreement_module.TIMED_CALLS, agreement_module.TIMED_CALLS + 1])
def test_a_request_as_the_mode_switches_is_not_lost(tmp_path: Path, at: int) -> None:
    seen = run(tmp_path, step_s=SYNC_STEP_S + 0.05, stop_at={1: at}, calls=7)
    assert stops(seen)[:1] == [agreement_module.TIMED_CALLS + 1]
