"""Helper for the tests of sharded saves across nodes that share no folder (jobs/checkpoint/spread.py), run by
torchrun on 2 ranks (gloo); each rank is a "node" with its own folder BASE/node<rank>, the checkpoints go to
s3://spread/run on the moto server at $S3_ENDPOINT:

    torchrun --nproc-per-node 2 tests/spread_writer.py save BASE
        commits steps 1 and 2 (prints COMMITTED <step> on rank 0), then starts step 3, during whose upload
        rank 1 is SIGKILLed (its upload has sent part of its shard).
    torchrun --nproc-per-node 2 tests/spread_writer.py resume BASE
        what the next launch on other VMs does (Checkpointer.resume_spread, as the trainer): rank 0 picks the
        newest committed checkpoint on the store, each rank's node copies what its rank reads; prints
        "RESUMED <step> <rank> <value of its shard> <location>" per rank.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `jobs`

import jobs.checkpoint.uploader as uploader  # noqa: E402
from jobs.checkpoint import Checkpointer  # noqa: E402
from jobs.checkpoint.sharded import load_shards  # noqa: E402
from jobs.schema import CheckpointConfig, StorageConfig  # noqa: E402

NUMEL = 300_000  # fp32 per rank: 1.2 MB


def shards(rank: int, step: int) -> dict:
    return {"model": {f"w{rank}": torch.full((NUMEL,), float(10 * step + rank))}}


def killed_midway(client, bucket: str, key: str, local: Path, progress, stop):
    """Rank 1's upload of its shard of step 3 (streamed as DCP writes it): part of it reaches the store, then
    the process is killed."""
    if "step-000000003" in key and key.endswith(".distcp"):
        progress.wait_end(stop)
        client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes()[:1000])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_stream(client, bucket, key, local, progress, stop)


real_stream = uploader.stream_to_s3


def main() -> None:
    mode, base = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    storage = StorageConfig(endpoint_url=os.environ["S3_ENDPOINT"])
    ckpt = Checkpointer(CheckpointConfig(async_save=True, keep_last=2), base / f"node{rank}", "s3://spread/run",
                        storage, is_writer=rank == 0, run_id="spread-test", sharded=True, spread=True)
    if mode == "save":
        for step in (1, 2):
            ckpt.save(step, {"trainer": {"step": step}}, {"loss": 1.0 / step}, shards=shards(rank, step))
            assert ckpt.flush(timeout=60), f"step {step} did not commit"
            dist.barrier()
            if rank == 0:
                print(f"COMMITTED {step}", flush=True)
        if rank == 1:
            uploader.stream_to_s3 = killed_midway
        ckpt.save(3, {"trainer": {"step": 3}}, {"loss": 0.3}, shards=shards(rank, 3))
        ckpt.flush(timeout=60)
    else:
        template, state = {"model": {f"w{rank}": torch.empty(NUMEL)}}, {}

        def apply(small: dict, reader) -> None:  # what the trainer does: its shards through DCP's reader
            load_shards("", template, reader)
            state.update(small)
        found = ckpt.resume_spread(apply)
        print(f"RESUMED {state['trainer']['step']} {rank} {template['model'][f'w{rank}'][0].item()} {found}",
              flush=True)
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
