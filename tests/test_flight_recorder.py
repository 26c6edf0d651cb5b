"""torch's flight recorder on a hang (jobs.flight_recorder): a rank's daemon thread answers the supervisor's
request with its last collectives, beside its stack. Pure: the request and answer with a stand-in for torch's
dump, and a real gloo record read back (torch 2.13 records gloo collectives too). The real hangs
(tests/test_watchdog.py, tests/test_slurm_restarts.py) check the records of both ranks of a hung run."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import flight_recorder
from jobs.flight_recorder import collect, last_collective, record_file, recording, request, serve

TRACE = {"version": "2.10", "entries": [
    {"pg_id": 0, "collective_seq_id": 6, "profiling_name": "gloo:all_reduce", "state": "completed", "is_p2p": False},
    {"pg_id": 0, "collective_seq_id": 7, "profiling_name": "gloo:all_reduce", "state": "scheduled", "is_p2p": False},
    {"pg_id": 1, "collective_seq_id": 40, "profiling_name": "gloo:all_gather", "state": "completed", "is_p2p": False},
]}


def test_a_serving_rank_answers_each_request_once_and_not_an_older_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(flight_recorder, "POLL_S", 0.05)
    old = tmp_path / "old"
    (tmp_path / "logs" / "stacks").mkdir(parents=True)
    (tmp_path / "logs" / "stacks" / flight_recorder.REQUEST).write_text(f"{old}\n")  # a previous attempt's
    calls = []

    def dump() -> bytes:
        calls.append(1)
        return pickle.dumps(TRACE)

    assert serve(tmp_path, 3, dump) is not None
    dest = tmp_path / "logs" / "stacks" / "hang-1"
    with recording(tmp_path, dest):
        pass
    assert json.loads(record_file(dest, 3).read_text())["entries"][1]["collective_seq_id"] == 7
    assert not old.exists() and len(calls) == 1  # the stale request was not answered
    assert request(tmp_path, tmp_path / "hang-2") == [3] and collect(tmp_path / "hang-2", [3], 5) == [3]
    assert len(calls) == 2


def test_a_rank_whose_process_ended_is_not_waited_for(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "logs" / "stacks"
    folder.mkdir(parents=True)
    import socket

    (folder / ".flight-recorder-rank0").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    (folder / ".flight-recorder-rank1").write_text(json.dumps({"pid": 1, "host": "another-node"}))
    assert request(tmp_path, tmp_path / "d") == [1]  # another node's rank answers for itself
    assert collect(tmp_path / "d", [1], 0.3) == []  # bounded: nobody answered


def test_the_last_collective_is_the_default_groups_newest() -> None:
    assert last_collective(TRACE) == (7, "gloo:all_reduce", "scheduled")
    assert last_collective({"entries": []}) is None


@pytest.mark.slow
def test_a_real_gloo_record_names_the_collectives(tmp_path: Path) -> None:
    """Two gloo ranks all-reduce three times, then each dumps its record through the same call the serving
    thread makes: both name the third all_reduce as their newest collective."""
    code = (
        "import os, pickle, torch, torch.distributed as dist\n"
        "os.environ['TORCH_FR_BUFFER_SIZE'] = '100'\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.ones(2)\n"
        "for _ in range(3):\n"
        "    dist.all_reduce(t)\n"
        "from jobs.flight_recorder import _torch_dump, _readable, _write, record_file\n"
        "from pathlib import Path\n"
        "_write(record_file(Path(os.environ['DEST']), dist.get_rank()), _readable(pickle.loads(_torch_dump()())))\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n")
    script = tmp_path / "fr.py"
    script.write_text(code)
    env = {"DEST": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    import os

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        seq, op, _ = last_collective(json.loads(record_file(tmp_path, rank).read_text()))
        assert seq == 3 and op == "gloo:all_reduce", (rank, seq, op)
