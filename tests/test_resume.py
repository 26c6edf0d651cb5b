"""Tier 2: exact resume. A run stopped at a drawn step (SIGTERM: it saves first; SIGKILL: it
does not) and relaunched with the same command ends bit-for-bit equal to an uninterrupted run.

The steps are drawn from RESUME_SEED (default 0), so a failure is reproduced by the same seed; each
test prints its seed and step, and another seed tries other steps."""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

from conftest import Uninterrupted, final_params, launch_until_step, read_result, run_cli

pytestmark = pytest.mark.slow

# vgg_pretrain keeps dropout on, so the RNG state must be restored too; 11 steps per epoch on 2 ranks
BASE = ["trainer.epochs=2", "checkpoint.every_steps=4", "logging.log_every=1", "logging.progress_bar=false"]
CASES = {
    "2ranks-sigterm": (["parallel.procs_per_node=2"], signal.SIGTERM),
    "2ranks-sigkill": (["parallel.procs_per_node=2"], signal.SIGKILL),
    "2ranks-accum-sigterm": (["parallel.procs_per_node=2", "trainer.micro_batch=16"], signal.SIGTERM),
    "1rank-sigterm": (["parallel.procs_per_node=1"], signal.SIGTERM),
    "1rank-sigkill": (["parallel.procs_per_node=1"], signal.SIGKILL),
}


def _kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants at once, as a dying machine would (torchrun runs
    its ranks in sessions of their own, so a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("case", list(CASES))
def test_stopped_and_relaunched_equals_uninterrupted(case: str, runs_dir: Path, uninterrupted: Uninterrupted) -> None:
    extra, sig = CASES[case]
    overrides = BASE + extra
    seed = int(os.environ.get("RESUME_SEED", "0"))
    target = random.Random(f"{seed}-{case}").randint(13, 18)  # inside epoch 1 (steps 12-21 of 22)
    print(f"stopping {case} near step {target} (RESUME_SEED={seed}; set it to draw other steps)")
    if "parallel.procs_per_node=1" in extra:
        uninterrupted.start(overrides)  # one rank leaves a core idle: the reference trains on it meanwhile

    proc = launch_until_step("vgg_pretrain", overrides, runs_dir, "cut", target, timeout=120)
    if sig == signal.SIGKILL:
        _kill_tree(proc.pid)
    else:
        os.kill(proc.pid, sig)  # the launcher forwards it to torchrun, which forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out

    if sig == signal.SIGTERM:
        stopped = read_result(runs_dir / "cut")
        assert stopped["outcome"] == "preempted" and stopped["signal"] == "SIGTERM", stopped
        assert 12 < stopped["step"] < 22 and stopped["epoch"] == 1, f"not a mid-epoch stop: {stopped}"
        assert stopped["checkpoints_committed"]
        assert "the same command resumes it" in out

    again = run_cli("launch", "vgg_pretrain", *overrides, "--run-name", "cut", runs_dir=runs_dir, check=True)
    log = (runs_dir / "cut" / "logs" / "rank0.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed, again.stdout
    resumed_step = int(resumed[-1].split(": step ")[1].split(",")[0])
    if sig == signal.SIGTERM:
        assert resumed_step == stopped["step"]  # saved on the signal: nothing lost
    else:
        assert resumed_step % 4 == 0 and resumed_step <= target + 4  # the last periodic checkpoint
    assert read_result(runs_dir / "cut")["outcome"] == "completed"

    straight, cut = uninterrupted(overrides), final_params(runs_dir / "cut")
    assert straight.keys() == cut.keys()
    for key in straight:
        assert torch.equal(straight[key], cut[key]), f"{case}: {key} differs after resume"
