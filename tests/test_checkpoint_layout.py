"""The checkpoint package's seams: a torch-free layout that every part imports and none of the parts
importing each other in a cycle; the uploader's parts free of the local writer (and torch); one
definition of "best" shared by the trainer's progress and retention; the save policy."""
from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.checkpoint.layout import (MANIFEST, OWNER_FILE, FileEntry, Manifest, manifest_run_id, owner_record,
                                    parse_owner_record, parse_step_dir, step_dir_name)
from jobs.checkpoint.policy import SavePolicy, best_after, score
from jobs.checkpoint.retention import retained
from jobs.schema import CheckpointConfig

PACKAGE = Path(__file__).resolve().parent.parent / "jobs" / "checkpoint"
MAX_LINES = 400
UPLOADER_PARTS = {"uploader", "upload_state", "owner", "early", "rounds", "published", "remote_files", "backoff"}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a deferred import is still an edge)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module of jobs.checkpoint (short name) -> the package's modules it imports (short names)."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    prefix = "jobs.checkpoint."
    return {m: {i[len(prefix):] for i in imports_of(PACKAGE / f"{m}.py")
                if i.startswith(prefix) and i[len(prefix):] in modules} for m in modules}


def test_the_package_has_no_import_cycle() -> None:
    """local.py imported store.py and store.py local.py (inside a function, to dodge the cycle)."""
    graph, state, path = package_graph(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_layout_imports_none_of_the_package_and_no_torch() -> None:
    imported = imports_of(PACKAGE / "layout.py")
    assert not {i for i in imported if i.startswith("jobs.checkpoint")}, imported
    assert not {i for i in imported if i.split(".")[0] in {"torch", "numpy", "fsspec"}}, imported
    assert {i for i in imported if i.startswith("jobs.")} <= {"jobs.schema.run_dir", "jobs.schema.run_dir.MANIFEST",
                                                              "jobs.schema.run_dir.STEP_DIR"}, imported


def test_writers_uploaders_and_readers_do_not_import_each_other() -> None:
    graph = package_graph()
    for part in UPLOADER_PARTS:
        assert not graph[part] & {"local", "reader", "sharded", "saver", "staging", "checkpointer"}, (part, graph[part])
    assert not graph["reader"] & ({"local", "checkpointer"} | UPLOADER_PARTS), graph["reader"]
    assert not graph["local"] & ({"reader", "checkpointer"} | UPLOADER_PARTS), graph["local"]
    assert not graph["store"] & {"local", "reader", "checkpointer"}, graph["store"]


@pytest.mark.parametrize("module", ["jobs.checkpoint.layout", "jobs.checkpoint.policy", "jobs.checkpoint.uploader",
                                    "jobs.storage"])
def test_torch_free_parts_load_without_torch(module: str) -> None:
    """The control plane reads owner records (jobs.storage) and the layout without importing torch; the
    uploader's parts need none either. The package's __init__ must not pull torch in on the way."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {module} imported torch"


def test_the_package_still_exports_its_names() -> None:
    import jobs.checkpoint as package

    for name in package.__all__:
        assert getattr(package, name) is not None
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_no_module_of_the_package_is_over_400_lines() -> None:
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_step_folder_names_round_trip() -> None:
    assert step_dir_name(123) == "step-000000123"
    assert parse_step_dir(step_dir_name(123)) == 123
    assert parse_step_dir("step-x") is None and parse_step_dir("latest") is None and parse_step_dir(MANIFEST) is None
    with pytest.raises(ValueError):
        step_dir_name(-1)


def test_owner_record_round_trips_and_refuses_what_names_no_run() -> None:
    text = owner_record("run-a", 12.5)
    assert json.loads(text) == {"run_id": "run-a", "created": 12.5} and text.endswith("\n")
    assert parse_owner_record(text, OWNER_FILE) == "run-a"
    for bad in ('{"run_id": 3}', "[1]", '{"created": 1}'):
        with pytest.raises(ValueError, match=OWNER_FILE):
            parse_owner_record(bad, OWNER_FILE)


def test_manifest_round_trips_and_names_its_run() -> None:
    manifest = Manifest(7, {"val/acc": 0.5}, time.time(), {"model.pt": FileEntry(3, "ab"), "x": FileEntry(1, "cd", 2)},
                        "run-a")
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest_run_id(manifest.to_json()) == "run-a"
    assert manifest_run_id('{"format": 99}') is None


# ---------------------------------------------------------------------- "best", once
def manifests(values: list[float]) -> dict[str, Manifest]:
    return {step_dir_name(s): Manifest(s, {"val/loss": v}, 0.0, {}) for s, v in enumerate(values, 1)}


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("values", [[0.3, 0.1, 0.2], [0.1, 0.3, 0.3, 0.2], [math.nan, 0.5, math.nan, 0.4], [0.2]])
def test_the_trainers_best_is_the_best_checkpoint_retention_keeps(mode: str, values: list[float]) -> None:
    """progress.best (folded by best_after) is the metric of the checkpoint retention keeps as the best:
    one definition, NaN never best, min or max as configured."""
    cfg = CheckpointConfig(keep_last=1, best_metric="val/loss", best_mode=mode)  # type: ignore[arg-type]
    best = None
    for v in values:
        best = best_after(cfg, best, {"val/loss": v})
    real = [v for v in values if not math.isnan(v)]
    assert best == (max(real) if mode == "max" else min(real))
    found = manifests(values)
    assert any(found[n].metrics["val/loss"] == best for n in retained(found, cfg))


def test_best_ignores_a_missing_metric_and_no_best_metric() -> None:
    cfg = CheckpointConfig(best_metric="val/acc")
    assert best_after(cfg, 0.5, {"val/loss": 1.0}) == 0.5
    assert best_after(cfg, None, {"val/acc": math.nan}) is None
    assert best_after(CheckpointConfig(), None, {"val/acc": 1.0}) is None
    assert score(CheckpointConfig(), {"val/acc": 1.0}) is None


# ---------------------------------------------------------------------- when to save
def test_save_policy_steps_end_and_stop() -> None:
    policy = SavePolicy(CheckpointConfig(every_steps=5))
    assert [s for s in range(1, 12) if policy.due_after_step(s, False, False)] == [5, 10]
    assert policy.due_after_step(3, True, False) and policy.due_after_step(3, False, True)
    assert policy.due_at_end(12) and not policy.due_at_end(10)  # 10 was just saved
    assert not SavePolicy(CheckpointConfig(at_end=False)).due_at_end(12)
    assert SavePolicy(CheckpointConfig()).due_at_end(10)  # every_steps off: the end always saves


def test_save_policy_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    policy = SavePolicy(CheckpointConfig(every_minutes=1.0))
    assert not policy.due_by_time()
    now[0] += 61
    assert policy.due_by_time()
    policy.restart_clock()
    assert not policy.due_by_time()
    assert not SavePolicy(CheckpointConfig()).due_by_time()
