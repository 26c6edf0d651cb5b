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
from jobs.training.slow_ranks import MIN_STEPS, ComputeClock, SlowRank, find_slow

TESTS = REPO / "tests"


# ----------------------------------------------------------------------------- the rule, pure
def test_a_rank_slower_than_the_median_of_the_others_by_the_factor_is_named() -> None:
    assert find_slow([0.040, 0.084], steps=100, factor=1.5) == [(1, 0.084, 0.040)]
    # 4 ranks, one slow: compared with the median of the three others, not with a median it lifts itself
    assert find_slow([0.040, 0.041, 0.090, 0.039], steps=10, factor=1.5) == [(2, 0.090, 0.040)]
    # two slow ranks of four (a sick node with two GPUs): both named
    assert [r for r, _, _ in find_slow([0.04, 0.09, 0.09, 0.04], steps=10, factor=1.5)] == [1, 2]


def test_equal_ranks_and_ranks_within_the_factor_are_not_named() -> None:
    assert find_slow([0.040, 0.040, 0.040], steps=100, factor=1.5) == []
    assert find_slow([0.040, 0.059], steps=100, factor=1.5) == []  # 1.48x: under the factor
    assert find_slow([0.040, 0.061], steps=100, factor=1.5) == [(1, 0.061, 0.040)]
    assert find_slow([0.040, 0.061], steps=100, factor=2.0) == []  # the factor is the setting's


def test_too_few_steps_one_rank_or_the_report_off_names_nobody() -> None:
    assert find_slow([0.04, 0.40], steps=MIN_STEPS - 1, factor=1.5) == []
    assert find_slow([0.04, 0.40], steps=MIN_STEPS, factor=1.5) == [(1, 0.40, 0.04)]
    assert find_slow([0.40], steps=100, factor=1.5) == []
    assert find_slow([0.04, 0.40], steps=100, factor=0) == []


def test_a_tiny_difference_on_a_tiny_model_is_noise_not_a_slow_rank() -> None:
    assert find_slow([0.001, 0.003], steps=100, factor=1.5) == []  # 3x, but 2 ms a step


def test_the_warning_names_rank_host_ratio_figures_and_steps() -> None:
    line = SlowRank(1, "host-b", 0.084, 0.040, 101, 200).line()
    assert line == ("slow rank: rank 1 on host-b takes 2.1x the median compute time per step of the other ranks "
                    "(0.084 s vs 0.040 s) over steps 101-200")
    assert "(0.041 s vs 0.36 ms)" in SlowRank(1, "h", 0.04125, 0.00036, 1, 5).line()


def test_the_clock_times_from_step_start_to_the_last_backward_only() -> None:
    import time

    import torch

    clock = ComputeClock(torch.device("cpu"))
    for _ in range(3):
        clock.start()
        time.sleep(0.02)
        clock.mark()
        time.sleep(0.05)  # waiting in the gradient all-reduce: not compute
    assert 0.06 <= clock.take() < 0.12
    assert clock.take() == 0.0  # taken: the next window starts empty


def test_the_clock_on_cuda_times_the_device_work_without_waiting_for_it() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the events path of ComputeClock is timed on a GPU only")
    clock, x = ComputeClock(torch.device("cuda")), torch.randn(2048, 2048, device="cuda")
    clock.start()
    for _ in range(20):
        x = x @ x / 2048
    clock.mark()
    torch.cuda._sleep(10_000_000)  # work after the mark (the gradient all-reduce): not compute
    seconds = clock.take()
    assert 0 < seconds < 1 and clock.take() == 0.0


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
    warn = "12:00:0{} [rank0] WARNING jobs.trainer: " + SlowRank(1, "host-b", 0.084, 0.040, 1, 10).line()
    worse = "12:00:09 [rank0] WARNING jobs.trainer: " + SlowRank(1, "host-b", 0.0012, 0.0004, 11, 20).line()
    run = _recorded_run(tmp_path, ["12:00:00 [rank0] INFO jobs.train: rank 0 of 2 on host-a", warn.format(5), worse])
    found = slow_ranks(read_run(run))
    assert len(found) == 1 and not found[0].failure
    assert found[0].what == ("rank 1 on host-b was slow in 2 log intervals between steps 1 and 20: up to 3.0x the "
                             "median compute time per step of the other ranks (1.20 ms vs 0.40 ms)")
    assert [line.where for line in found[0].evidence] == ["logs/rank0.log:2", "logs/rank0.log:3"]
    assert "--exclude=HOST" in found[0].fix
    assert exit_code(diagnose(read_run(run))) == 0  # worth knowing, nothing failed
    assert slow_ranks(read_run(_recorded_run(tmp_path / "equal", ["12:00:00 [rank0] INFO step 10"]))) == []


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
