"""Tier 1: `launch` refuses a remote checkpoint folder of another run, and a bad `--run-id`, before
anything is written or started (a local folder stands in for the store; test_s3_runs has S3)."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def _launch(runs_dir: Path, remote: Path, *extra: str) -> tuple[int, str]:
    proc = run_cli("launch", "digits", f"checkpoint.uri=file://{remote}", "--run-name", "x", *extra,
                   runs_dir=runs_dir, timeout=120)
    return proc.returncode, proc.stderr


def test_a_new_run_may_not_take_another_runs_folder(runs_dir: Path, tmp_path: Path) -> None:
    remote = tmp_path / "store"
    (remote / "x").mkdir(parents=True)
    (remote / "x" / "run-owner.json").write_text(json.dumps({"run_id": "aaa111"}))
    code, err = _launch(runs_dir, remote)
    assert code == 2 and err.startswith("error: checkpoint folder file://"), err
    assert "belongs to run id aaa111, not to a new run" in err and "HINT:" in err and "--run-id aaa111" in err
    assert not (runs_dir / "x").exists()
    assert sorted(p.name for p in (remote / "x").iterdir()) == ["run-owner.json"]


def test_run_id_must_be_an_id_and_match_the_run(runs_dir: Path, tmp_path: Path) -> None:
    code, err = _launch(runs_dir, tmp_path / "store", "--run-id", "../x")
    assert code == 2 and "--run-id '../x'" in err and "Traceback" not in err, err
    assert not (runs_dir / "x").exists()

    (runs_dir / "x").mkdir()
    (runs_dir / "x" / "run.json").write_text(json.dumps({"run_name": "x", "run_id": "bbb222"}))
    code, err = _launch(runs_dir, tmp_path / "store", "--run-id", "ccc333")
    assert code == 2 and "bbb222" in err and "ccc333" in err, err
    assert sorted(p.name for p in (runs_dir / "x").iterdir()) == ["run.json"]


def test_sbatch_refuses_another_runs_folder_too(runs_dir: Path, tmp_path: Path) -> None:
    remote = tmp_path / "store"
    (remote / "x").mkdir(parents=True)
    (remote / "x" / "run-owner.json").write_text(json.dumps({"run_id": "aaa111"}))
    proc = run_cli("sbatch", "digits", f"checkpoint.uri=file://{remote}", "--run-name", "x",
                   "--cluster", "local_slurm", runs_dir=runs_dir, timeout=120)
    assert proc.returncode == 2 and "belongs to run id aaa111" in proc.stderr, proc.stderr
    assert not (runs_dir / "x").exists()
