"""The one place a rank learns who it is.

Every backend (torchrun locally or on VMs, submitit/srun on Slurm) normalises its scheduler's
variables to torchrun's names at its boundary; the trainer reads only this `RankEnv`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RankEnv:
    rank: int  # global rank
    local_rank: int  # rank on this machine; picks the GPU
    world_size: int  # ranks in the job
    local_world_size: int  # ranks on this machine
    master_addr: str  # rendezvous host (rank 0's machine)
    master_port: int  # rendezvous port

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "RankEnv":
        """Read torchrun's variables; absent ones mean a single process (`python -m jobs.train`)."""
        env = os.environ if environ is None else environ
        try:
            return cls(
                rank=int(env.get("RANK", "0")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
            )
        except ValueError as err:
            raise RuntimeError(f"malformed rank environment variable: {err}") from None

    def check(self) -> None:
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise RuntimeError(f"inconsistent rank environment: {self}")
