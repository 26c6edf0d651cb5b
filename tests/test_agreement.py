"""The stop agreement on 2 real gloo processes: every rank acts on a stop at the same call; with short
steps one call after the request (asynchronous), with long steps at the request's own call (synchronous),
and a request made as the mode switches is not lost. One pair of processes runs every scenario, each with
an agreement of its own."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.training.agreement import SYNC_STEP_S, TIMED_CALLS, StopAgreement

pytestmark = pytest.mark.slow  # real processes

# name -> (rank 1's step time over the timed calls, {rank: the call at which it asks to stop}, calls)
SCENARIOS = {"short": (0.0, {1: 6}, 10), "long": (SYNC_STEP_S + 0.05, {0: 7}, 8),
             "at the last timed call": (SYNC_STEP_S + 0.05, {1: TIMED_CALLS}, 7),
             "at the switch": (SYNC_STEP_S + 0.05, {1: TIMED_CALLS + 1}, 7)}


def _rank(rank: int, store: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen: dict[str, list] = {}
    for name, (step_s, stop_at, calls) in SCENARIOS.items():
        agreement, seen[name] = StopAgreement(), []
        for call in range(1, calls + 1):
            if rank == 1 and call <= TIMED_CALLS:
                time.sleep(step_s)  # rank 1 is the slow one: its step time decides for both
            stop, _ = agreement.exchange(stop_at.get(rank) == call, False)
            seen[name].append([call, stop, agreement.synchronous])
        agreement.drain()
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("agreement")
    mp.spawn(_rank, args=(str(tmp / "store"), str(tmp)), nprocs=2)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # the same answers at the same calls on every rank
    return ranks[0]


def stops(calls: list[list]) -> list[int]:
    return [call for call, stop, _ in calls if stop]


def test_short_steps_stay_asynchronous_and_act_one_call_later(seen: dict[str, list]) -> None:
    assert not any(sync for _, _, sync in seen["short"])
    assert stops(seen["short"]) == [7]


def test_long_steps_switch_to_synchronous_and_act_at_the_requests_call(seen: dict[str, list]) -> None:
    switched = [call for call, _, sync in seen["long"] if sync]
    assert switched == list(range(TIMED_CALLS + 1, 9))
    assert stops(seen["long"]) == [7]  # requested on rank 0 at call 7, agreed at call 7 on both ranks


@pytest.mark.parametrize("scenario", ["at the last timed call", "at the switch"])
def test_a_request_as_the_mode_switches_is_not_lost(seen: dict[str, list], scenario: str) -> None:
    assert stops(seen[scenario])[:1] == [TIMED_CALLS + 1]
