"""Tier 1: the one place that reads the rank environment."""
from __future__ import annotations

import pytest

from jobs.env import RankEnv


def test_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "node7", "MASTER_PORT": "12345"}.items():
        monkeypatch.setenv(key, value)
    env = RankEnv.from_environ()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port) == ("node7", 12345)
    assert env.distributed and not env.is_main
    env.check()


def test_single_process_defaults() -> None:
    env = RankEnv.from_environ({})
    assert env.rank == 0 and env.world_size == 1 and not env.distributed and env.is_main


def test_inconsistent_environment_is_refused() -> None:
    with pytest.raises(RuntimeError, match="inconsistent"):
        RankEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"}).check()
    with pytest.raises(RuntimeError, match="malformed"):
        RankEnv.from_environ({"RANK": "x"})
