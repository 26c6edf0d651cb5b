"""The shared kernel both planes import: config sections, their loader, user-facing errors, secrets.

    recipe.py   recipe sections (what to train)      cluster.py  cluster sections (where)
    build.py    dict -> typed dataclass, checked      checks.py   range checks shared by sections
    files.py    lookup by name, overrides, one loader, resolved YAML in a run directory
    run_dir.py  a run directory's one reader: layout, resolved configs, typed records (run.json, result.json)
    errors.py   UsageError / ConfigError (exit 2)     safe_yaml.py bounded YAML reading
    names.py    the rule for run, recipe and sweep names    secrets.py  masking and secrets.yaml

`launcher/` (control plane) and `jobs/` (inside a rank) both import from here; nothing here imports them.
"""
from jobs.schema.cluster import ClusterConfig, SlurmConfig, StorageConfig
from jobs.schema.errors import ConfigError, UsageError
from jobs.schema.files import (CLUSTERS_DIR, RECIPES_DIR, REPO_ROOT, config_hash, find_config, from_document, load, load_cluster,
                          load_recipe, load_resolved, parse_overrides, recipe_document, search_path, to_dict, to_yaml)
from jobs.schema.recipe import (CheckpointConfig, DataConfig, LoggingConfig, LossConfig, ModelConfig, OptimConfig,
                           ParallelConfig, RecipeConfig, ScheduleConfig, ScriptConfig, TrainerConfig)

__all__ = [
    "CLUSTERS_DIR", "RECIPES_DIR", "REPO_ROOT", "CheckpointConfig", "ClusterConfig", "ConfigError", "DataConfig",
    "LoggingConfig", "LossConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RecipeConfig", "ScheduleConfig", "ScriptConfig",
    "SlurmConfig", "StorageConfig", "TrainerConfig", "UsageError", "config_hash", "find_config", "from_document", "load",
    "load_cluster", "load_recipe", "load_resolved", "parse_overrides", "recipe_document", "search_path", "to_dict",
    "to_yaml",
]
