"""Retention: which committed checkpoints to keep (the last K and the best one), and pruning the rest."""
from __future__ import annotations

from typing import Callable

from jobs.checkpoint.errors import FILE_ONLY, log
from jobs.checkpoint.layout import Manifest
from jobs.checkpoint.policy import score
from jobs.checkpoint.store import Store
from jobs.schema import CheckpointConfig


def retained(manifests: dict[str, Manifest], cfg: CheckpointConfig) -> set[str]:
    """The newest `keep_last` committed checkpoints plus the best one by `best_metric` (as the policy
    scores it: the trainer's progress.best is the same value)."""
    newest = sorted(manifests, key=lambda n: manifests[n].step, reverse=True)
    keep = set(newest[:cfg.keep_last])
    scored = [(s, m.step, n) for n, m in manifests.items() if (s := score(cfg, m.metrics)) is not None]
    if scored:
        keep.add(max(scored)[2])  # ties: the newer one
    return keep


def prune(store: Store, cfg: CheckpointConfig, protected: Callable[[set[str]], set[str]]) -> None:
    """Delete committed checkpoints outside `retained()` and uncommitted folders older than the
    newest committed one (newer ones may still be in progress). `protected(keep)` names folders
    that must stay anyway (being uploaded, waiting for upload)."""
    dirs, manifests = store.committed()
    if not manifests:
        return  # never delete the only candidates for resume
    keep = retained(manifests, cfg)
    keep |= protected(keep)
    newest = max(m.step for m in manifests.values())
    for name, step in sorted(dirs.items(), key=lambda item: item[1]):
        if name in keep or (name not in manifests and step >= newest):
            continue
        what = "committed" if name in manifests else "uncommitted leftover"
        log.info("deleting %s checkpoint %s (retention: keep_last=%d, best_metric=%s)",
                 what, store.location(name), cfg.keep_last, cfg.best_metric, extra=FILE_ONLY)
        store.remove(name)
