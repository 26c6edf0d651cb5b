"""Tier 1: the typed records of a run directory (jobs/schema/run_dir.py), read and written by both planes."""
from __future__ import annotations

import json
from pathlib import Path

from jobs.schema.run_dir import Run, RunInfo, RunResult, committed_steps


def test_run_info_is_typed_and_keeps_keys_it_does_not_know(tmp_path: Path) -> None:
    run = Run("r", tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_name": "r", "launches": 2, "job_ids": ["1"],
                                                   "from_a_newer_version": {"x": 1}}))
    info = run.info()
    assert (info.run_name, info.launches, info.job_ids, info.pid) == ("r", 2, ["1"], None)
    run.update(job_id="2", job_ids=info.job_ids + ["2"])
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk["from_a_newer_version"] == {"x": 1} and on_disk["job_ids"] == ["1", "2"]
    assert "pid" not in on_disk  # unset fields are not written as null


def test_a_field_of_the_wrong_type_makes_the_record_unreadable_not_wrong(tmp_path: Path) -> None:
    run = Run("r", tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_name": "r", "pid": "123"}))
    (tmp_path / "result.json").write_text(json.dumps({"outcome": "completed", "step": True}))
    assert run.info() == RunInfo() and not run.result()
    assert run.problems() == ["run.json unreadable: 'pid' is '123', not a int",
                              "result.json unreadable: 'step' is True, not a int"]


def test_run_result_keeps_metrics_flat_in_the_file(tmp_path: Path) -> None:
    run = Run("r", tmp_path)
    run.write_result(RunResult(outcome="completed", step=7, epoch=1, metrics={"val/acc": 0.5}))
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "outcome": "completed", "step": 7, "epoch": 1, "signal": None, "checkpoints_committed": None, "val/acc": 0.5}
    result = run.result()
    assert result and result.step == 7 and result.metrics == {"val/acc": 0.5}
    assert not list(tmp_path.glob(".*.tmp"))


def test_only_checkpoints_with_a_manifest_count_as_committed(tmp_path: Path) -> None:
    for step, committed in ((2, True), (10, True), (12, False)):
        (tmp_path / f"step-{step:08d}").mkdir()
        if committed:
            (tmp_path / f"step-{step:08d}" / "manifest.json").write_text("{}")
    (tmp_path / "step-x").mkdir()
    assert committed_steps(tmp_path) == [2, 10] and committed_steps(tmp_path / "missing") == []


def test_an_empty_or_unreadable_record_is_false(tmp_path: Path) -> None:
    run = Run("r", tmp_path)
    assert not run.info() and not run.result()
    (tmp_path / "run.json").write_text("{not json")
    assert not run.info()
    run_json = tmp_path / "run.json"
    run_json.unlink()
    run.update(launches=1)
    assert run.info() and run.info().launches == 1
