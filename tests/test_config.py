"""Tier 1: config loading and validation, pure and fast."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from launcher.cli import main
from launcher.config import (CLUSTERS_DIR, RECIPES_DIR, ClusterConfig, RecipeConfig, load_cluster, load_recipe,
                             load_resolved, parse_overrides, to_yaml)
from launcher.errors import ConfigError

ALL_RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))
ALL_CLUSTERS = sorted(CLUSTERS_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    assert recipe.trainer.global_batch == recipe.trainer.micro_batch * recipe.grad_accum * recipe.parallel.world_size


@pytest.mark.parametrize("path", ALL_CLUSTERS, ids=lambda p: p.stem)
def test_every_shipped_cluster_config_loads(path: Path) -> None:
    assert load_cluster(str(path)).name == path.stem


def test_shipped_configs_found_recursively() -> None:
    assert {"digits", "vgg_pretrain", "vgg_finetune"} <= {p.stem for p in ALL_RECIPES}
    assert "local" in {p.stem for p in ALL_CLUSTERS}


def test_overrides_are_typed_and_nested() -> None:
    assert parse_overrides(["trainer.epochs=2", "optim.lr=0.5", "model.freeze=[features]"]) == {
        "trainer": {"epochs": 2}, "optim": {"lr": 0.5}, "model": {"freeze": ["features"]}}
    recipe = load_recipe("digits", ["trainer.epochs=2", "optim.lr=1e-3", "data.classes=[1, 2]"])
    assert recipe.trainer.epochs == 2 and recipe.optim.lr == 1e-3 and recipe.data.classes == (1, 2)


def test_resolved_config_roundtrips(tmp_path: Path) -> None:
    recipe = load_recipe("vgg_finetune", ["trainer.epochs=3"])
    (tmp_path / "config.yaml").write_text(to_yaml(recipe))
    assert load_resolved(tmp_path / "config.yaml", RecipeConfig) == recipe
    cluster = load_cluster("local")
    (tmp_path / "cluster.yaml").write_text(to_yaml(cluster))
    assert load_resolved(tmp_path / "cluster.yaml", ClusterConfig) == cluster


def test_sections_are_frozen() -> None:
    recipe = load_recipe("digits")
    with pytest.raises(Exception):
        recipe.trainer.epochs = 3  # type: ignore[misc]


def _error(overrides: list[str], recipe: str = "digits") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, overrides)
    return info.value


def test_unknown_key_lists_valid_keys_and_suggests() -> None:
    err = _error(["trainer.epocs=3"])
    assert err.key == "trainer.epocs"
    assert "did you mean 'epochs'" in str(err) and "micro_batch" in str(err)
    assert "digits.yaml" in str(err)


def test_unknown_section() -> None:
    err = _error(["optimizer.lr=1"])
    assert err.key == "optimizer" and "did you mean 'optim'" in str(err)


@pytest.mark.parametrize("override, key, words", [
    ("trainer.epochs=two", "trainer.epochs", "expected int"),
    ("trainer.epochs=0", "trainer.epochs", "must be > 0"),
    ("optim.lr=-0.1", "optim.lr", "must be > 0"),
    ("trainer.precision=fp8", "trainer.precision", "choose one of: fp32, bf16, fp16"),
    ("model.dropout=1.5", "model.dropout", "between 0 and 1"),
    ("data.val_fraction=1", "data.val_fraction", "between 0 and 1"),
    ("trainer.deterministic=yes please", "trainer.deterministic", "expected bool"),
    ("parallel.strategy=fsdp", "parallel.strategy", "not implemented"),
    ("data.classes=[1, 1, 2]", "data.classes", "distinct"),
    ("model.freeze=features", "model.freeze", "expected a list"),
])
def test_wrong_type_or_range(override: str, key: str, words: str) -> None:
    err = _error([override])
    assert err.key == key and words in str(err)


def test_impossible_topology_says_what_to_change() -> None:
    err = _error(["trainer.global_batch=96", "trainer.micro_batch=32", "parallel.procs_per_node=2"])
    assert err.key == "trainer.global_batch"
    assert "32 x 2 = 64" in str(err) and "multiple of 64" in str(err)


def test_explicit_grad_accum_must_agree() -> None:
    assert load_recipe("digits", ["trainer.global_batch=128", "trainer.grad_accum=2"]).grad_accum == 2
    err = _error(["trainer.global_batch=128", "trainer.grad_accum=3"])
    assert err.key == "trainer.grad_accum" and "= 2" in str(err)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epochs: 2\n   micro_batch: [\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(bad))
    assert str(bad) in str(info.value) and "malformed YAML" in str(info.value) and "line 3" in str(info.value)


def test_missing_epochs_and_steps(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("trainer:\n  global_batch: 64\n  micro_batch: 64\n")
    with pytest.raises(ConfigError, match="neither epochs nor max_steps"):
        load_recipe(str(f))


def test_cluster_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("backend: slurm\n")
    with pytest.raises(ConfigError, match="no slurm: section"):
        load_cluster(str(f))
    f.write_text("backend: local\nstorage:\n  endpoint: http://x\n")
    with pytest.raises(ConfigError, match="did you mean 'endpoint_url'"):
        load_cluster(str(f))


@pytest.mark.parametrize("args, words", [
    (["show", "digitz"], "did you mean 'digits'"),
    (["show", "recipes/nope.yaml"], "recipes/nope.yaml: recipe file not found"),
    (["show", "digits", "--cluster", "nowhere"], "unknown cluster config 'nowhere'"),
    (["show", "digits", "trainer.epochs"], "must look like section.key=value"),
])
def test_cli_errors_exit_2(args: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_bad_launch_starts_nothing(runs_dir: Path) -> None:
    """Through the real CLI: exit 2, a message naming the file and key, and no run directory."""
    proc = run_cli("launch", "digits", "trainer.micro_batch=0", runs_dir=runs_dir)
    assert proc.returncode == 2
    assert "digits.yaml" in proc.stderr and "trainer.micro_batch" in proc.stderr
    assert list(runs_dir.iterdir()) == []


def test_show_prints_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["show", "digits", "trainer.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "world size 2" in out and "backend: local" in out


def test_slurm_config_mistakes_are_caught_before_submission(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "gpu.yaml"
    f.write_text("backend: slurm\nslurm:\n  time_min: 1\n  grace_period_s: 120\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(str(f))
    assert info.value.key == "slurm.time_min" and "grace period of 120 s" in str(info.value)
    f.write_text("backend: slurm\nslurm:\n  gpus_per_node: 8\n  partiton: gpu\n")
    with pytest.raises(ConfigError, match="did you mean 'partition'"):
        load_cluster(str(f))
    f.write_text("backend: slurm\nslurm:\n  gpus_per_node: 8\n")
    assert main(["launch", "digits", "--cluster", str(f), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "slurm.gpus_per_node" in err and "parallel.procs_per_node=2" in err and "set parallel.procs_per_node=8" in err
    assert not (tmp_path / "runs").exists()
