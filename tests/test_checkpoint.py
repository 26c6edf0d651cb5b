"""Checkpointer against real parts: the local disk, fsspec's memory store and a writer process killed
with SIGKILL (object stores: test_checkpoint_s3.py). Nothing about the store is mocked."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from jobs.checkpoint import MANIFEST, CheckpointError, Checkpointer, step_dir_name
from jobs.storage import filesystem
from jobs.weights import export_model, strip_prefixes
from jobs.schema import CheckpointConfig, StorageConfig
REPO = Path(__file__).resolve().parent.parent


def make_cfg(**overrides: Any) -> CheckpointConfig:
    """Short retries so tests with a dead store take seconds."""
    return CheckpointConfig(**{"upload_retries": 2, "flush_timeout_s": 30.0, **overrides})


def trained_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt, state_of(model, opt, step=1)


def state_of(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "trainer": {"step": step, "epoch": 0, "losses": [0.5, 0.25]},
            "rng": [{"torch": torch.get_rng_state(), "seed": 7}, {"torch": torch.get_rng_state(), "seed": 8}]}


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone(v) for v in obj)
    return obj


def committed_steps(fs: Any, root: str) -> set[int]:
    fs.invalidate_cache()
    if not fs.exists(root):
        return set()
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    return {int(n[5:]) for n in names if n.startswith("step-") and fs.exists(f"{root}/{n}/{MANIFEST}")}


def step_dirs(folder: Path) -> set[int]:
    return {int(p.name[5:]) for p in folder.glob("step-*")}


# ----------------------------------------------------------------------------- 1. round trip
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_roundtrip_keeps_the_values_at_save_time(tmp_path: Path, async_save: bool) -> None:
    model, opt, state = trained_state()
    ckpt = Checkpointer(make_cfg(async_save=async_save, keep_last=3), tmp_path, None, StorageConfig())
    expected = {}
    for step in (1, 2, 3):
        state = state_of(model, opt, step)
        expected[step] = clone(state)
        ckpt.save(step, state, {"loss": 1.0 / step})
        with torch.no_grad():  # training goes on while the async save is in flight
            for p in model.parameters():
                p.add_(1.0)
        opt.state_dict()["state"][0]["exp_avg"].mul_(3.0)
    assert ckpt.flush(10)
    ckpt.close()

    assert ckpt.latest() == str(tmp_path / "step-000000003")
    for step in (1, 2, 3):
        loaded = ckpt.load(str(tmp_path / step_dir_name(step)))
        assert_same(expected[step], loaded)
    saves = [json.loads(line) for line in (tmp_path / "saves.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saves if s["event"] == "save"] == [1, 2, 3]
    assert all(s["bytes"] > 10_000 and s["commit_s"] >= s["blocked_s"] >= 0 for s in saves)
    assert (tmp_path / "latest").read_text().strip() == "step-000000003"


def test_non_writer_only_reads(tmp_path: Path) -> None:
    _, _, state = trained_state()
    writer = Checkpointer(make_cfg(async_save=False), tmp_path, None, StorageConfig())
    reader = Checkpointer(make_cfg(async_save=False), tmp_path, None, StorageConfig(), is_writer=False)
    reader.save(5, state, {})
    assert reader.latest() is None and reader.flush(1)
    writer.save(4, state, {})
    assert reader.latest() == str(tmp_path / "step-000000004")


class NotATensor:
    def __init__(self) -> None:
        self.payload = "runs code when unpickled"


def test_arbitrary_objects_are_refused_at_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(make_cfg(async_save=True), tmp_path, None, StorageConfig())
    with pytest.raises(TypeError, match=r"trainer\.sampler.*NotATensor"):
        ckpt.save(1, {"model": {"w": torch.ones(2)}, "trainer": {"sampler": NotATensor()}}, {})
    assert ckpt.flush(5)
    assert ckpt.latest() is None and not list(tmp_path.glob("step-*"))


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    """A committed checkpoint (valid manifest) holding a class instance: weights_only must refuse it."""
    folder = tmp_path / "step-000000001"
    folder.mkdir()
    torch.save({"obj": NotATensor()}, folder / "trainer.pt")
    data = (folder / "trainer.pt").read_bytes()
    manifest = {"format": 1, "step": 1, "metrics": {}, "created": time.time(),
                "files": {"trainer.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    ckpt = Checkpointer(make_cfg(), tmp_path, None, StorageConfig(), is_writer=False)
    assert ckpt.latest() == str(folder)
    with pytest.raises(CheckpointError, match="weights_only"):
        ckpt.load(str(folder))


# ----------------------------------------------------------------------------- 2. commit protocol
def test_uncommitted_truncated_and_altered_checkpoints_are_skipped(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    _, _, state = trained_state()
    ckpt = Checkpointer(make_cfg(async_save=False, keep_last=10), tmp_path, None, StorageConfig())
    for step in (1, 2, 3):
        ckpt.save(step, state, {"loss": float(step)})
    shutil.copytree(tmp_path / "step-000000003", tmp_path / "step-000000004")
    (tmp_path / "step-000000004" / MANIFEST).unlink()  # files, no commit marker
    model3 = tmp_path / "step-000000003" / "model.pt"
    model3.write_bytes(model3.read_bytes()[:-100])  # truncated
    model2 = tmp_path / "step-000000002" / "model.pt"
    data = bytearray(model2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte altered
    model2.write_bytes(bytes(data))
    (tmp_path / "latest").write_text("step-000000004\n")  # the pointer must not be trusted

    caplog.set_level(logging.WARNING, logger="jobs.checkpoint")
    assert ckpt.latest() == str(tmp_path / "step-000000001")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-000000004" in w and "manifest" in w for w in warnings)
    assert any("step-000000003" in w and "bytes" in w for w in warnings)
    assert any("step-000000002" in w and "SHA-256" in w for w in warnings)
    with pytest.raises(CheckpointError, match="step-000000002"):
        ckpt.load(str(tmp_path / "step-000000002"))
    assert_same(state["model"], ckpt.load(str(tmp_path / "step-000000001"))["model"])


def test_a_corrupt_committed_step_is_rewritten_but_an_intact_one_kept(tmp_path: Path) -> None:
    """Resuming from step 1 because step 2 is corrupt: saving step 2 again must replace it."""
    first = Checkpointer(make_cfg(async_save=False), tmp_path, None, StorageConfig())
    first.save(1, {"model": {"w": torch.ones(4)}}, {})
    first.save(2, {"model": {"w": torch.ones(4) * 2}}, {})
    model2 = tmp_path / "step-000000002" / "model.pt"
    data = bytearray(model2.read_bytes())
    data[-30] ^= 0xFF
    model2.write_bytes(bytes(data))
    resumed = Checkpointer(make_cfg(async_save=True), tmp_path, None, StorageConfig())
    assert resumed.latest() == str(tmp_path / "step-000000001")
    resumed.save(1, {"model": {"w": torch.zeros(4)}}, {})  # intact: kept as it is
    resumed.save(2, {"model": {"w": torch.ones(4) * 20}}, {})
    assert resumed.flush(10)
    resumed.close()
    assert resumed.latest() == str(tmp_path / "step-000000002")
    assert torch.equal(resumed.load(str(tmp_path / "step-000000002"))["model"]["w"], torch.ones(4) * 20)
    assert torch.equal(resumed.load(str(tmp_path / "step-000000001"))["model"]["w"], torch.ones(4))


# ----------------------------------------------------------------------------- 3. SIGKILL mid-write
@pytest.mark.slow  # a writer process killed mid-save
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path: Path, mode: str) -> None:
    args = [sys.executable, str(REPO / "tests" / "ckpt_writer.py"), str(tmp_path)]
    args += ["--async"] if mode == "async" else []
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        lines = []
        while (line := proc.stdout.readline()) and line.strip() != "WRITING":  # type: ignore[union-attr]
            lines.append(line)
        stderr = "" if line else proc.stderr.read()  # type: ignore[union-attr]
        assert line.strip() == "WRITING", f"the writer ended early: {lines} {stderr}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step2 = tmp_path / "step-000000002"
    assert step2.is_dir() and not (step2 / MANIFEST).exists(), "the kill should land mid-write"

    fresh = Checkpointer(make_cfg(), tmp_path, None, StorageConfig())
    assert fresh.latest() == str(tmp_path / "step-000000001")
    assert fresh.load(fresh.latest() or "")["trainer"] == {"step": 1}
    fresh.save(3, {"model": {"w": torch.zeros(3)}}, {})  # the next commit removes the leftover
    assert fresh.flush(10)
    fresh.close()
    assert step_dirs(tmp_path) == {1, 3}


# ----------------------------------------------------------------------------- 4. retention
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_keeps_last_two_and_the_best(tmp_path: Path, async_save: bool) -> None:
    remote = f"memory://retention-{uuid.uuid4().hex}/run"
    cfg = make_cfg(async_save=async_save, keep_last=2, best_metric="val/acc", best_mode="max")
    (tmp_path / "step-000000000").mkdir()  # an old interrupted save: deleted once newer ones commit
    ckpt = Checkpointer(cfg, tmp_path, remote, StorageConfig())
    accuracy = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8}
    for step, acc in accuracy.items():
        ckpt.save(step, {"model": {"w": torch.full((4,), float(step))}}, {"val/acc": acc, "loss": 1 - acc})
    assert ckpt.flush(10)
    ckpt.close()
    assert ckpt.latest() == str(tmp_path / "step-000000005")  # on both stores: the local copy is faster
    assert step_dirs(tmp_path) == {2, 4, 5}
    fs, root = filesystem(remote, StorageConfig())
    assert committed_steps(fs, root) == {2, 4, 5}
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} >= {"step-000000002", "step-000000004"}
    assert len([p for p in fs.ls(root, detail=False) if "step-" in p]) == 3


def test_retention_min_mode_without_remote(tmp_path: Path) -> None:
    cfg = make_cfg(async_save=False, keep_last=1, best_metric="loss", best_mode="min")
    ckpt = Checkpointer(cfg, tmp_path, None, StorageConfig())
    for step, loss in {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.4}.items():
        ckpt.save(step, {"model": {"w": torch.ones(2)}}, {"loss": loss})
    assert step_dirs(tmp_path) == {2, 4}


def test_local_checkpoints_missing_remotely_are_uploaded_by_the_next_run(tmp_path: Path) -> None:
    """A run that died before uploading: the next Checkpointer on the same local folder uploads."""
    offline = Checkpointer(make_cfg(async_save=False), tmp_path, None, StorageConfig())
    offline.save(1, {"model": {"w": torch.ones(2)}}, {})
    offline.save(2, {"model": {"w": torch.ones(2) * 2}}, {})
    remote = f"memory://resume-{uuid.uuid4().hex}/run"
    ckpt = Checkpointer(make_cfg(async_save=True), tmp_path, remote, StorageConfig())
    assert ckpt.flush(10)
    ckpt.close()
    assert committed_steps(*filesystem(remote, StorageConfig())) == {1, 2}


# ----------------------------------------------------------------------------- 6. prefixes, map_location
class Wrapper(nn.Module):
    """What DistributedDataParallel looks like to state_dict(): the model under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_strip_prefixes_of_ddp_and_compiled_models() -> None:
    bare = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for wrapped in (Wrapper(bare), torch.compile(Wrapper(bare)), Wrapper(torch.compile(bare))):
        stripped = strip_prefixes(wrapped.state_dict())
        assert list(stripped) == list(bare.state_dict()), type(wrapped)
        assert stripped._metadata[""] == bare.state_dict()._metadata[""]  # type: ignore[attr-defined]
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).load_state_dict(stripped)
    inner = {"features._orig_mod.0.weight": torch.ones(1), "head.module.bias": torch.ones(1)}
    assert list(strip_prefixes(inner)) == ["features.0.weight", "head.module.bias"]  # a real submodule named module
    with pytest.raises(ValueError, match="both become"):
        strip_prefixes({"module.w": torch.ones(1), "w": torch.ones(1)})


def test_load_with_map_location_and_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ckpt = Checkpointer(make_cfg(async_save=False), tmp_path / "ck", None, StorageConfig())
    ckpt.save(7, {"model": Wrapper(torch.compile(bare)).state_dict(), "trainer": {"step": 7}}, {})
    location = ckpt.latest() or ""
    on_meta = ckpt.load(location, map_location="meta", keys=["model"])
    assert set(on_meta) == {"model"} and on_meta["model"]["module._orig_mod.0.weight"].is_meta
    on_cpu = ckpt.load(location, map_location=torch.device("cpu"))["model"]
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh.load_state_dict(strip_prefixes(on_cpu))
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), bare(x))

    exported = export_model(location, str(tmp_path / "export" / "model.pt"), StorageConfig())
    plain = torch.load(exported, weights_only=True)
    assert list(plain) == ["0.weight", "0.bias", "2.weight", "2.bias"]
