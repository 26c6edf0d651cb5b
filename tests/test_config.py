"""Tier 1: config loading and validation, pure and fast."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import run_cli
from launcher.cli import main
from launcher.preflight import Target
from jobs.schema import (CLUSTERS_DIR, RECIPES_DIR, ClusterConfig, RecipeConfig, load_cluster, load_recipe,
                    load_resolved, parse_overrides, to_yaml)
from jobs.schema.errors import ConfigError

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
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'epochs'"):
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
    ("trainer.precision=fp4", "trainer.precision", "choose one of: fp32, bf16, fp16, fp8"),
    ("model.dropout=1.5", "model.dropout", "between 0 and 1"),
    ("data.val_fraction=1", "data.val_fraction", "between 0 and 1"),
    ("trainer.deterministic=yes please", "trainer.deterministic", "expected bool"),
    ("parallel.pipeline_schedule=1f1b", "parallel.pipeline_schedule", "only read with parallel.strategy=pipeline"),
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
    with pytest.raises(ConfigError, match="neither epochs nor max_steps") as info:
        load_recipe(str(f))
    assert info.value.key == "trainer" and info.value.source == str(f)


def test_cluster_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("backend: slurm\n")
    with pytest.raises(ConfigError, match="no slurm: section") as info:
        load_cluster(str(f))
    assert info.value.key == "slurm"
    f.write_text("backend: local\nstorage:\n  endpoint: http://x\n")
    with pytest.raises(ConfigError, match="did you mean 'endpoint_url'") as info:
        load_cluster(str(f))
    assert info.value.key == "storage.endpoint"


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
    with pytest.raises(ConfigError, match="did you mean 'partition'") as info:
        load_cluster(str(f))
    assert info.value.key == "slurm.partiton"
    f.write_text("backend: slurm\nslurm:\n  gpus_per_node: 8\n")
    assert main(["launch", "digits", "--cluster", str(f), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "slurm.gpus_per_node" in err and "parallel.procs_per_node=2" in err and "set parallel.procs_per_node=8" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- numbers that are not numbers
@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),  # a string that float() turns into NaN
    ("optim.lr=1e999", "optim.lr"),  # a string that float() turns into infinity
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("model.width=.inf", "model.width"),
    ("schedule.gamma=.nan", "schedule.gamma"),
    ("trainer.grad_clip=.nan", "trainer.grad_clip"),
    ("checkpoint.every_minutes=.nan", "checkpoint.every_minutes"),
    ("checkpoint.flush_timeout_s=.inf", "checkpoint.flush_timeout_s"),
])
def test_nan_and_infinity_are_refused(override: str, key: str) -> None:
    err = _error([override])
    assert err.key == key and "is not a finite number" in str(err) and "digits.yaml" in str(err)


@pytest.mark.parametrize("override, key, words", [
    ("optim.betas=[5,-3]", "optim.betas[0]", "5.0 must be in [0, 1)"),
    ("optim.betas=[0.9,1]", "optim.betas[1]", "1.0 must be in [0, 1)"),
    ("optim.betas=[-0.1,0.9]", "optim.betas[0]", "-0.1 must be in [0, 1)"),
    ("trainer.seed=-1", "trainer.seed", "between 0 and 2147483647"),
    ("trainer.seed=4294967296", "trainer.seed", "between 0 and 2147483647"),
    ("data.split_seed=-5", "data.split_seed", "between 0 and 2147483647"),
    ("trainer.max_steps=100000000000000000000", "trainer.max_steps", "out of range (more than 64 bits)"),
    ("model.pretrained=''", "model.pretrained", "is empty"),
    ("checkpoint.uri=' '", "checkpoint.uri", "is empty"),
    ("checkpoint.best_metric=''", "checkpoint.best_metric", "is empty"),
    ("logging.project=''", "logging.project", "is empty"),
    ("data.root=''", "data.root", "is empty"),
])
def test_values_out_of_range_name_the_key(override: str, key: str, words: str) -> None:
    err = _error([override])
    assert err.key == key and words in str(err)


def test_an_empty_freeze_prefix_would_freeze_everything() -> None:
    err = _error(["model.freeze=[features.0, '']"], recipe="vgg_finetune")
    assert err.key == "model.freeze[1]" and "is empty" in str(err)


@pytest.mark.parametrize("override, key, words", [
    ("slurm.mem_gb=0", "slurm.mem_gb", "0 must be > 0"),
    ("slurm.mem_gb=-4", "slurm.mem_gb", "-4 must be > 0"),
    ("slurm.time_min=1000000000000", "slurm.time_min", "more than 365 days"),
    ("slurm.time_min=1.0e+12", "slurm.time_min", "expected int, got float"),
    ("slurm.partition=''", "slurm.partition", "is empty"),
    ("slurm.account=' '", "slurm.account", "is empty"),
    ("slurm.qos=''", "slurm.qos", "is empty"),
    ("slurm.constraint=''", "slurm.constraint", "is empty"),
    ("slurm.python=''", "slurm.python", "is empty"),
    ("slurm.extra_sbatch=['--exclusive', '']", "slurm.extra_sbatch[1]", "is empty"),
    ("runs_dir=''", "runs_dir", "is empty"),
    ("storage.endpoint_url=''", "storage.endpoint_url", "is empty"),
    ("storage.region=''", "storage.region", "is empty"),
])
def test_cluster_values_out_of_range_name_the_key(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_cluster("local_slurm", [override])
    assert info.value.key == key and words in str(info.value) and "local_slurm.yaml" in str(info.value)


def test_time_limit_hint_says_the_maximum() -> None:
    with pytest.raises(ConfigError, match=r"(?s)more than 365 days.*HINT: use at most 525600") as info:
        load_cluster("local_slurm", ["slurm.time_min=600000"])
    assert info.value.key == "slurm.time_min"


# ----------------------------------------------------------------------------- YAML the loader refuses
def test_duplicate_keys_name_file_key_and_both_lines(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("trainer:\n  epochs: 2\n  micro_batch: 32\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(f))
    assert info.value.key == "trainer.epochs" and str(f) in str(info.value)
    assert "duplicate key (lines 2 and 4)" in str(info.value)
    c = tmp_path / "c.yaml"
    c.write_text("backend: local\nruns_dir: a\nbackend: slurm\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: backend: duplicate key \(lines 1 and 3\)") as info:
        load_cluster(str(c))
    assert info.value.key == "backend"


def test_duplicate_keys_in_an_override_value() -> None:
    err = _error(["model={variant: vgg11, variant: vgg13}"])
    assert err.source == "command line" and err.key == "model.variant" and "duplicate key" in str(err)


def test_merge_keys_may_override_on_purpose(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("optim: &o {name: sgd, lr: 0.5}\ntrainer:\n  max_steps: 2\n"
                 "checkpoint: {every_steps: 1}\n")
    assert load_recipe(str(f)).optim.lr == 0.5
    g = tmp_path / "g.yaml"
    g.write_text("trainer: &t {epochs: 2, max_steps: 3}\ntrainer2: {<<: *t, epochs: 4}\n")
    with pytest.raises(ConfigError, match="trainer2: unknown key") as info:  # merged fine, then refused as a key
        load_recipe(str(g))
    assert info.value.key == "trainer2"


@pytest.mark.parametrize("text, key, words", [
    ("1: x\n", "", "line 1: key '1' (read as int) is not a string"),
    ("null: x\n", "", "key 'null' (read as null) is not a string"),
    ("? [a]\n: b\n", "", "line 1: key that is a list or mapping is not a string"),
    ("backend: slurm\nslurm:\n  env:\n    on: 1\n", "slurm.env", "line 4: key 'on' (read as bool) is not a string"),
])
def test_keys_must_be_strings(tmp_path: Path, text: str, key: str, words: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_cluster(str(f))
    assert info.value.key == key and words in str(info.value) and "HINT: keys are names" in str(info.value)


def _bomb(levels: int) -> str:
    """Nested aliases: each level refers to the previous one ten times, so 10**levels values in all."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "description: {" + ", ".join(lines) + "}\n"


def test_alias_bomb_is_refused_with_one_short_line(tmp_path: Path) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text(_bomb(6))  # a million values: the old loader put all of them in the error message
    with pytest.raises(ConfigError) as info:
        load_recipe(str(f))
    text = str(info.value)
    assert "more than 10000 values once aliases are expanded" in text and str(f) in text
    assert info.value.key.startswith("description.") and len(text) < 600


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("model: &m\n  freeze: *m\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(f))
    assert info.value.key == "model.freeze"
    assert "model.freeze: line 1: an alias refers to a value that contains it" in str(info.value)


@pytest.mark.parametrize("content, words", [
    (b"description: caf\xe9\n", "not UTF-8: byte 0xe9 at offset 16"),
    (b"description: a\x00b\n", "line 1: character U+0000 is not allowed in YAML"),
    (b"x: " + b"[" * 2000 + b"]" * 2000, "line 1: nested more than 64 levels deep"),  # no RecursionError
    (b"x: " + b"[" * 70 + b"]" * 70 + b"\n", "nested more than 64 levels deep"),
    (b"description: 2001-13-01\n", "line 1, column 14: '2001-13-01' is not a valid timestamp"),
    (b"trainer: {epochs: !!int two}\n", "'two' is not a valid int"),
    (b"trainer: {epochs: !!int }\n", "'' is not a valid int"),
    (b"trainer: {deterministic: !!bool maybe}\n", "'maybe' is not a valid bool"),
    (b"trainer: {epochs: " + b"9" * 5000 + b"}\n", "is not a valid int"),
    (b"model: !!python/object/apply:os.system [echo hi]\n", "could not determine a constructor"),
    (b"model:\n\tname: cnn\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    (b"a: 1\n---\nb: 2\n", "expected a single document"),
    (b"- 1\n- 2\n", "expected a mapping at the top level, got list"),
    (b"description: " + b"x" * (300 << 10) + b"\n", "larger than 256 KiB"),
])
def test_unusable_files_are_one_clean_line(tmp_path: Path, content: bytes, words: str) -> None:
    f = tmp_path / "r.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(f))
    text = str(info.value)
    assert words in text and str(f) in text
    assert len(text.splitlines()) <= 2 and len(text) < 600


def test_huge_values_are_cut_in_messages() -> None:
    err = _error(["model.variant=" + "v" * 60_000])
    assert err.key == "model.variant" and "unknown VGG variant 'vvvv" in str(err) and "..." in str(err)
    assert len(str(err)) < 600


def test_control_characters_in_keys_stay_on_one_line() -> None:
    err = _error(["trainer.epo\nchs=1"])
    assert len(str(err).splitlines()) == 2 and "trainer.epo\\nchs" in str(err)


# ----------------------------------------------------------------------------- error lines under long paths
# A project cloned to a long path used to lose the end of the problem: the line was cut at a fixed length.
TIED = ("the tied embedding and output weights would sit on the first and the last stage (their gradient would "
        "have to be summed across stages, which is not built)")
PIPELINE_OVERRIDES = ["parallel.strategy=pipeline", "parallel.procs_per_node=2", "parallel.microbatches=4",
                      "model.kwargs.dim=32", "model.kwargs.layers=3", "model.kwargs.seq_len=32",
                      "data.kwargs.seq_len=32", "trainer.global_batch=8", "trainer.micro_batch=8",
                      "model.kwargs.tied_embeddings=true"]


def _deep(tmp_path: Path, depth: int = 12) -> Path:
    folder = tmp_path.joinpath(*[f"folder{i:02d}-" + "x" * 20 for i in range(depth)])
    folder.mkdir(parents=True)
    return folder


def test_a_long_source_path_gives_way_to_the_key_and_the_problem() -> None:
    path = "/" + "/".join(f"projects{i}" + "p" * 20 for i in range(11)) + "/recipes/gpt_small.yaml"
    assert len(path) > 300
    err = ConfigError(path, "model.kwargs.tied_embeddings", TIED, "set model.kwargs.tied_embeddings=false")
    line = str(err).splitlines()[0]
    assert line.endswith(f"/recipes/gpt_small.yaml: model.kwargs.tied_embeddings: {TIED}"), line
    assert line.startswith("/projects0") and "/.../" in line and len(line) <= 350


def test_a_long_override_list_is_shortened_before_the_path() -> None:
    given = " ".join(f"model.kwargs.option_{i}={i}" for i in range(40))
    err = ConfigError(f"/home/me/project/recipes/x.yaml (with overrides {given})", "trainer.epochs", "x" * 200)
    line = str(err).splitlines()[0]
    assert line.startswith("/home/me/project/recipes/x.yaml (with overrides model.kwargs.option_0=0 "), line
    assert "...): trainer.epochs: " + "x" * 200 == line[line.index("...)"):] and len(line) <= 350


def test_a_pipeline_error_keeps_its_problem_under_a_long_recipe_path(tmp_path: Path) -> None:
    recipe = _deep(tmp_path) / "gpt_small.yaml"
    recipe.write_text((RECIPES_DIR / "gpt_small.yaml").read_text())
    assert len(str(recipe)) > 300
    err = _error(PIPELINE_OVERRIDES, str(recipe))
    line = str(err).splitlines()[0]
    assert err.key == "model.kwargs.tied_embeddings" and line.endswith(f"model.kwargs.tied_embeddings: {TIED}"), line
    assert "gpt_small.yaml (with overrides parallel.strategy=pipeline" in line and len(line) <= 350


def test_a_path_is_cut_in_its_middle_so_its_file_name_stays(tmp_path: Path) -> None:
    code_dir = _deep(tmp_path) / "my_code"
    assert len(str(code_dir)) > 300
    with pytest.raises(ConfigError) as info:  # code_dir is checked as a launch loads the recipe
        Target.load("local").recipe("digits", [f"code_dir={code_dir}"])
    assert "/.../" in str(info.value) and "/my_code' is not a directory" in str(info.value)


def test_load_resolved_refuses_an_edited_file_cleanly(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(load_recipe("digits")).replace("lr: 0.1", "lr: .nan"))
    with pytest.raises(ConfigError, match="optim.lr: nan is not a finite number") as info:
        load_resolved(f, RecipeConfig)
    assert info.value.key == "optim.lr" and str(f) in str(info.value)


def test_overrides_are_bounded_too() -> None:
    err = _error(["model.variant=" + "v" * 70_000])
    assert err.key == "model.variant" and "value longer than 65536 characters" in str(err)
    bomb = _bomb(6).split(": ", 1)[1].strip()
    err = _error([f"description={bomb}"])
    assert err.source == "command line" and "more than 10000 values once aliases are expanded" in str(err)
