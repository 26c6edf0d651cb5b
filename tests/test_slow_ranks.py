"""Issue 24, points 4 and 6: the slow-rank report and the collective timeouts as settings.

The detection rule is pure (measured numbers in, slow ranks out); one real 2-rank launch has rank 1's
forward pass slowed on purpose (tests/slow_model.py) and checks the warning, metrics.jsonl, run.json,
`launcher status`, `launcher doctor` and the process group's timeout in the log; two gloo processes
show the timeout reaching init_process_group (a collective one rank never joins fails after it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from launcher.doctor.diagnose import diagnose
from launcher.doctor.findings import exit_code
from launcher.doctor.records import read_run
from launcher.doctor.slow import slow_ranks
from jobs.schema import load_recipe
from jobs.schema.run_dir import Run
from jobs.training.slow_ranks import MIN_STEPS, SlowRank, SlowRankReport, StepClock, StepSplit, find_slow

TESTS = REPO / "tests"


# ----------------------------------------------------------------------------- the rule, pure
def _splits(compute: list[float], data: list[float] | None = None, sync: list[float] | None = None) -> list[StepSplit]:
    """Ranks' figures per step; data and sync small and equal unless given."""
    n = len(compute)
    return [StepSplit(c, d, s) for c, d, s in zip(compute, data or [0.001] * n, sync or [0.005] * n)]


def test_a_rank_slower_than_the_median_of_the_others_by_the_factor_is_named() -> None:
    assert find_slow(_splits([0.040, 0.084]), steps=100, factor=1.5) == [(1, "compute", 0.084, 0.040)]
    # 4 ranks, one slow: compared with the median of the three others, not with a median it lifts itself
    assert find_slow(_splits([0.040, 0.041, 0.090, 0.039]), steps=10, factor=1.5) == [(2, "compute", 0.090, 0.040)]
    # two slow ranks of four (a sick node with two GPUs): both named
    assert [r for r, *_ in find_slow(_splits([0.04, 0.09, 0.09, 0.04]), steps=10, factor=1.5)] == [1, 2]


def test_equal_ranks_and_ranks_within_the_factor_are_not_named() -> None:
    assert find_slow(_splits([0.040, 0.040, 0.040]), steps=100, factor=1.5) == []
    assert find_slow(_splits([0.040, 0.059]), steps=100, factor=1.5) == []  # 1.48x: under the factor
    assert find_slow(_splits([0.040, 0.061]), steps=100, factor=1.5) == [(1, "compute", 0.061, 0.040)]
    assert find_slow(_splits([0.040, 0.061]), steps=100, factor=2.0) == []  # the factor is the setting's


def test_too_few_steps_one_rank_or_the_report_off_names_nobody() -> None:
    assert find_slow(_splits([0.04, 0.40]), steps=MIN_STEPS - 1, factor=1.5) == []
    assert find_slow(_splits([0.04, 0.40]), steps=MIN_STEPS, factor=1.5) == [(1, "compute", 0.40, 0.04)]
    assert find_slow(_splits([0.40]), steps=100, factor=1.5) == []
    assert find_slow(_splits([0.04, 0.40]), steps=100, factor=0) == []
    assert find_slow(_splits([0.04, 0.04], data=[0.001, 0.4]), steps=100, factor=0) == []


def test_a_tiny_difference_on_a_tiny_model_is_noise_not_a_slow_rank() -> None:
    assert find_slow(_splits([0.001, 0.003]), steps=100, factor=1.5) == []  # 3x, but 2 ms a step
    assert find_slow(_splits([0.04, 0.04], data=[0.001, 0.009]), steps=100, factor=1.5) == []  # 9x, 8 ms


def test_a_rank_that_waits_longer_for_its_data_is_named_for_data_not_compute() -> None:
    """A sick disk or mount on rank 2's node: its compute is like the others', its loader is slow; the
    others then wait for it in the all-reduce (their sync is high), which names nobody."""
    per_rank = _splits([0.040, 0.041, 0.040, 0.039], data=[0.002, 0.001, 0.060, 0.002],
                       sync=[0.070, 0.069, 0.010, 0.071])
    assert find_slow(per_rank, steps=10, factor=1.5) == [(2, "data", 0.060, 0.002)]
    # within the factor, or under MIN_EXCESS_S above the others: not named
    assert find_slow(_splits([0.04, 0.04], data=[0.030, 0.044]), steps=10, factor=1.5) == []
    # a rank slow on both is named for each, compute first; ranks in order
    both = _splits([0.04, 0.09, 0.04, 0.04], data=[0.001, 0.05, 0.05, 0.001])
    assert find_slow(both, steps=10, factor=1.5) == [(1, "compute", 0.09, 0.04), (1, "data", 0.05, 0.001),
                                                     (2, "data", 0.05, 0.001)]


def test_the_warning_names_rank_host_ratio_figures_steps_and_where_the_step_goes() -> None:
    line = SlowRank(1, "host-a", "compute", 0.084, 0.040, 6, 10, StepSplit(0.084, 0.001, 0.010)).line()
    assert line == ("slow rank: rank 1 on host-a takes 2.1x the median compute time per step of the other ranks "
                    "(0.084 s vs 0.040 s) over steps 6-10; its step: compute 0.084 s, waiting for data 1.00 ms, in "
                    "the last backward and collectives 0.010 s")
    line = SlowRank(3, "host-b", "data", 0.060, 0.020, 11, 20, StepSplit(0.041, 0.060, 0.0004)).line()
    assert line == ("slow rank: rank 3 on host-b waits 3.0x the median time for data per step of the other ranks "
                    "(0.060 s vs 0.020 s) over steps 11-20; its step: compute 0.041 s, waiting for data 0.060 s, "
                    "in the last backward and collectives 0.40 ms")
    assert "(0.041 s vs 0.36 ms)" in SlowRank(1, "h", "compute", 0.04125, 0.00036, 1, 5,
                                                StepSplit(0.04125, 0, 0)).line()


def test_the_clock_splits_each_step_into_data_compute_and_sync() -> None:
    """Per step: the loader's next() takes 30 ms, compute 20 ms, the last backward and all-reduce 50 ms, and
    between steps 40 ms (an evaluation, a log line) that is none of the three."""
    import time

    import torch

    def loader():
        for step in range(3):
            time.sleep(0.03)
            yield step

    clock = StepClock(torch.device("cpu"))
    for _ in clock.batches(loader()):
        clock.start()
        time.sleep(0.02)
        clock.mark()
        time.sleep(0.05)  # waiting in the gradient all-reduce: not compute
        clock.end()
        time.sleep(0.04)  # between steps: neither data nor sync
    split = clock.take()
    assert 0.09 <= split.data < 0.15, split  # with the gaps between steps it would be 0.21
    assert 0.06 <= split.compute < 0.10, split
    assert 0.15 <= split.sync < 0.22, split  # with the gaps: 0.27
    assert clock.take() == StepSplit(0.0, 0.0, 0.0)  # taken: the next window starts empty


def test_a_step_redone_after_out_of_memory_waited_for_its_data_once() -> None:
    import time

    import torch

    clock = StepClock(torch.device("cpu"))
    for _ in clock.batches(iter([0])):
        time.sleep(0.02)  # the loader's wait seen at the first try's start
        for _ in range(2):  # the first try fails before its backward; the step is redone
            clock.start()
            time.sleep(0.01)
        clock.mark()
        clock.end()
    split = clock.take()
    assert 0.02 <= split.data < 0.03 and 0.01 <= split.compute < 0.03, split


def test_the_exchange_sends_three_figures_per_step_and_reads_them_back_by_rank(monkeypatch) -> None:
    """One all-gather of [compute, data, sync] per step of the window; rank r's row is rank r's split."""
    import torch

    from jobs.parallel import distributed
    from jobs.training import slow_ranks

    sent = []

    def gather(values):
        sent.append(list(values))
        return [list(values), [0.090, 0.002, 0.001], [0.040, 0.030, 0.050]]

    monkeypatch.setattr(slow_ranks.parallel, "gather_values", gather)
    monkeypatch.setattr(slow_ranks.parallel, "host_names", lambda: ["a", "b", "c"])
    report = SlowRankReport(1.5, torch.device("cpu"), 10)
    report.clock.compute, report.clock.data, report.clock.sync = 0.2, 0.01, 0.3
    assert report.exchange(14) is None and sent == []  # 4 steps: the window goes on
    per_rank, slow = report.exchange(20)
    assert sent == [[0.02, 0.001, 0.03]]  # totals over 10 steps, per step
    assert per_rank[1] == StepSplit(0.090, 0.002, 0.001) and per_rank[2] == StepSplit(0.040, 0.030, 0.050)
    assert [(s.rank, s.host, s.kind, s.first, s.last, s.split) for s in slow] == \
        [(1, "b", "compute", 11, 20, per_rank[1]), (2, "c", "data", 11, 20, per_rank[2])]
    # without a process group the gather is this rank's figures alone, as floats
    assert distributed.gather_values([1, 0.5, 0.25]) == [[1.0, 0.5, 0.25]]


def test_the_clock_on_cuda_times_the_device_work_without_waiting_for_it() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the events path of StepClock is timed on a GPU only")
    clock, x = StepClock(torch.device("cuda")), torch.randn(2048, 2048, device="cuda")
    for _ in clock.batches([0]):
        clock.start()
        for _ in range(20):
            x = x @ x / 2048
        clock.mark()
        torch.cuda._sleep(100_000_000)  # work after the mark (the gradient all-reduce): sync, not compute
        clock.end()
    split = clock.take()
    assert 0 < split.compute < split.sync < 5, split
    assert clock.take() == StepSplit(0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- settings and doctor, pure
def test_the_settings_are_validated_and_reach_the_process_group_options() -> None:
    import torch

    from jobs.env import RankEnv
    from jobs.parallel.distributed import process_group_options

    recipe = load_recipe("digits", ["parallel.collective_timeout_s=90", "parallel.nccl_error_handling=skip_clean_up",
                                    "trainer.slow_rank_factor=2"])
    env = RankEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="127.0.0.1", master_port=1)
    options = process_group_options(env, torch.device("cpu"), recipe.parallel)
    assert options["timeout"] == timedelta(seconds=90) and options["backend"] == "gloo" and options["rank"] == 1
    assert recipe.parallel.rank_environment() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert load_recipe("digits").parallel.rank_environment() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert recipe.trainer.slow_rank_factor == 2


@pytest.mark.parametrize("override,said", [
    ("parallel.collective_timeout_s=0", "parallel.collective_timeout_s: 0.0 must be > 0"),
    ("parallel.collective_timeout_s=-5", "parallel.collective_timeout_s: -5.0 must be > 0"),
    ("parallel.nccl_error_handling=sometimes", "parallel.nccl_error_handling: invalid value 'sometimes'"),
    ("trainer.slow_rank_factor=0.5", "trainer.slow_rank_factor: 0.5 must be above 1, or 0"),
    ("trainer.slow_rank_factor=1", "trainer.slow_rank_factor: 1.0 must be above 1, or 0"),
])
def test_a_bad_value_is_one_error_line_exit_2(override: str, said: str) -> None:
    proc = run_cli("show", "digits", override)
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "recipes/digits.yaml" in first and said in first, proc.stderr
    assert "Traceback" not in proc.stderr


def test_show_prints_the_timeouts_and_the_factor() -> None:
    out = run_cli("show", "digits", "parallel.collective_timeout_s=120", check=True).stdout
    assert "collective_timeout_s: 120.0" in out and "nccl_error_handling: tear_down" in out
    assert "slow_rank_factor: 1.5" in out


def _recorded_run(tmp_path: Path, lines: list[str]) -> Run:
    run = Run("slowrun", tmp_path / "slowrun")
    (run.dir / "logs").mkdir(parents=True)
    (run.dir / "logs" / "rank0.log").write_text("\n".join(lines) + "\n")
    (run.dir / "logs" / "rank1.log").write_text("12:00:00 [rank1] INFO jobs.train: rank 1 of 2 on host-b\n")
    return run


def test_doctor_names_the_slow_rank_as_a_note(tmp_path: Path) -> None:
    first = SlowRank(1, "host-b", "compute", 0.084, 0.040, 1, 10, StepSplit(0.084, 0.001, 0.010))
    warn = "12:00:0{} [rank0] WARNING jobs.trainer: " + first.line()
    worse = "12:00:09 [rank0] WARNING jobs.trainer: " + SlowRank(1, "host-b", "compute", 0.0012, 0.0004, 11, 20,
                                                                  StepSplit(0.0012, 0.0001, 0.02)).line()
    run = _recorded_run(tmp_path, ["12:00:00 [rank0] INFO jobs.train: rank 0 of 2 on host-a", warn.format(5), worse])
    found = slow_ranks(read_run(run))
    assert len(found) == 1 and not found[0].failure
    assert found[0].what == ("rank 1 on host-b was slow in 2 log intervals between steps 1 and 20: up to 3.0x the "
                             "median compute time per step of the other ranks (1.20 ms vs 0.40 ms); its step then: "
                             "compute 1.20 ms, waiting for data 0.10 ms, in the last backward and collectives 0.020 s")
    assert [line.where for line in found[0].evidence] == ["logs/rank0.log:2", "logs/rank0.log:3"]
    assert "--exclude=HOST" in found[0].fix and "compute_s/rankN" in found[0].fix
    assert exit_code(diagnose(read_run(run))) == 0  # worth knowing, nothing failed
    assert slow_ranks(read_run(_recorded_run(tmp_path / "equal", ["12:00:00 [rank0] INFO step 10"]))) == []


def test_doctor_names_a_rank_slow_on_data_apart_and_reads_warnings_of_older_launches(tmp_path: Path) -> None:
    data = SlowRank(1, "host-b", "data", 0.060, 0.002, 11, 20, StepSplit(0.040, 0.060, 0.001)).line()
    old = ("slow rank: rank 1 on host-b takes 2.1x the median compute time per step of the other ranks "
           "(0.084 s vs 0.040 s) over steps 1-10")  # before the step was split: no "its step"
    run = _recorded_run(tmp_path, [f"12:00:05 [rank0] WARNING jobs.trainer: {old}",
                                   f"12:00:09 [rank0] WARNING jobs.trainer: {data}"])
    compute, waits = slow_ranks(read_run(run))
    assert compute.what == ("rank 1 on host-b was slow once between steps 1 and 10: up to 2.1x the median compute "
                            "time per step of the other ranks (0.084 s vs 0.040 s)")
    assert waits.what == ("rank 1 on host-b was slow once between steps 11 and 20: up to 30.0x the median time for "
                          "data per step of the other ranks (0.060 s vs 2.00 ms); its step then: compute 0.040 s, "
                          "waiting for data 0.060 s, in the last backward and collectives 1.00 ms")
    assert [line.where for line in waits.evidence] == ["logs/rank0.log:2"]
    assert "data_s/rankN" in waits.fix and "nfsstat" in waits.fix and "compute_s" not in waits.fix


# ----------------------------------------------------------------------------- real processes
def test_a_rank_slowed_on_purpose_is_named_by_the_warning_status_and_doctor(runs_dir: Path) -> None:
    """rank 1's forward pass sleeps 40 ms a step; rank 0 names it every log interval. One launch, 12 steps."""
    proc = run_cli("launch", "digits", "model.target=slow_model:slowed", "model.kwargs.delay_s=0.04",
                   "data.target=slow_model:data", f"code_dir={TESTS}", "checkpoint.best_metric=null",
                   "trainer.epochs=null", "trainer.max_steps=12", "logging.log_every=6", "trainer.eval_every=0",
                   "checkpoint.every_steps=0", "checkpoint.at_end=false", "parallel.collective_timeout_s=120",
                   "--run-name", "slow", runs_dir=runs_dir, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs_dir / "slow"
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "collective timeout 120 s (parallel.collective_timeout_s), NCCL error handling tear_down" in log0
    warnings = [line for line in log0.splitlines() if "WARNING" in line and "slow rank:" in line]
    assert len(warnings) == 2, log0  # steps 1-6 and 7-12
    assert all("slow rank: rank 1 on " in w and "over steps " in w for w in warnings), warnings
    assert "over steps 1-6" in warnings[0] and "over steps 7-12" in warnings[1]
    assert "slow rank: rank 1" in proc.stdout  # rank 0's console too
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "compute_s/rank1" in r]
    assert [r["step"] for r in timed] == [6, 12]
    assert all(r["compute_s/rank1"] >= 0.04 > r["compute_s/rank0"] for r in timed), timed
    # rank 0 waits for rank 1 in the gradient all-reduce (sync), neither waits for data
    assert all(r["sync_s/rank0"] >= 0.02 > r["sync_s/rank1"] for r in timed), timed
    assert all(0 <= r[f"data_s/rank{n}"] < 0.02 for r in timed for n in (0, 1)), timed
    assert all("; its step: compute 0.04" in w and "waiting for data " in w for w in warnings), warnings
    status = run_cli("status", "slow", runs_dir=runs_dir, check=True).stdout
    assert "slow_rank: slow rank: rank 1 on " in status and "over steps 7-12" in status
    doctor = run_cli("doctor", "slow", runs_dir=runs_dir)
    assert doctor.returncode == 0, doctor.stdout
    assert doctor.stdout.startswith("NOTE: rank 1 on ") and "was slow in 2 log intervals" in doctor.stdout


TIMEOUT_RANK = textwrap.dedent("""
    import os, time
    import torch, torch.distributed as dist
    from jobs.env import RankEnv
    from jobs.parallel import init_distributed
    from jobs.schema import load_recipe

    recipe = load_recipe("digits", ["parallel.collective_timeout_s=2"])
    env = RankEnv.from_environ()
    init_distributed(env, torch.device("cpu"), recipe.parallel)
    if env.rank == 1:
        time.sleep(4)  # never joins the all-reduce below
        os._exit(0)  # no teardown: the group's peer is gone
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as err:
        print(f"FAILED after {time.monotonic() - start:.1f} s: {err}", flush=True)
    os._exit(0)
""")


def test_the_collective_timeout_reaches_the_process_group(tmp_path: Path) -> None:
    """Two gloo ranks; rank 1 never joins: rank 0's all-reduce fails after parallel.collective_timeout_s=2,
    not torch's 30 minutes, and the error names the 2000 ms."""
    from s3_server import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", TIMEOUT_RANK], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for r in (0, 1)]
    out = [p.communicate(timeout=60)[0] for p in procs]
    failed = [line for line in out[0].splitlines() if line.startswith("FAILED after")]
    assert failed, out[0]
    seconds = float(failed[0].split()[2])
    assert 1.5 <= seconds < 4, failed[0]
    assert "2000" in failed[0] or "0:00:02" in failed[0], failed[0]  # gloo: "Timed out waiting 2000ms"
