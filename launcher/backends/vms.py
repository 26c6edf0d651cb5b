"""Runs on cloud VMs reached over SSH (`backend: vms`). Everything is checked before a run directory exists:
the recipe against VMs without a shared file system, which hosts, and every host's SSH, Python and torch."""
from __future__ import annotations

from launcher.vms.checks import check_hosts, check_recipe_on_vms
from launcher.vms.hosts import resolve_hosts
from schema import ClusterConfig, RecipeConfig
from schema.errors import UsageError


def check(recipe: RecipeConfig, cluster: ClusterConfig) -> None:
    if cluster.vms is None:  # ClusterConfig.check refuses backend: vms without the section
        raise UsageError(f"cluster config {cluster.name!r} has no vms: section")
    src = f"cluster config {cluster.name}"
    check_recipe_on_vms(recipe, cluster, src)
    hosts = resolve_hosts(cluster.vms, src, recipe.parallel.nodes)
    check_hosts(cluster.vms, hosts, src)
