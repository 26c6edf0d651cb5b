"""`launcher export RUN --to s3://...` against a real S3 endpoint (moto's server on loopback): from the
newest checkpoint, and from the final model.pt of a run that kept no checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import fsspec
import pytest
import torch

from conftest import REPO, run_cli
from s3_server import TEST_CREDENTIALS, S3Server, s3_cluster

pytestmark = pytest.mark.slow  # a training run through the real CLI and a moto server on loopback

RUN = ["trainer.max_steps=4", "checkpoint.every_steps=0", "checkpoint.at_end=true", "parallel.procs_per_node=1",
       "logging.progress_bar=false"]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[S3Server, Path]]:
    yield from s3_cluster(tmp_path, "exports")


def _read(server: S3Server, key: str) -> dict[str, torch.Tensor]:
    fs = fsspec.filesystem("s3", endpoint_url=server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True)
    with fs.open(key, "rb") as f:
        return torch.load(f, weights_only=True)


def test_export_to_s3_from_a_checkpoint_and_from_the_final_model(s3: tuple[S3Server, Path], runs_dir: Path) -> None:
    server, cluster = s3
    run_cli("launch", "digits", *RUN, "--cluster", str(cluster), "--run-name", "small", runs_dir=runs_dir,
            env=TEST_CREDENTIALS, check=True)
    final = torch.load(runs_dir / "small" / "model.pt", weights_only=True)

    out = run_cli("export", "small", "--to", "s3://exports/from-ckpt/model.pt", runs_dir=runs_dir,
                  env=TEST_CREDENTIALS, check=True).stdout
    assert "step-000000004" in out
    exported = _read(server, "exports/from-ckpt/model.pt")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)

    shutil.rmtree(runs_dir / "small" / "checkpoints")  # kept no checkpoint: the final model.pt is exported
    out = run_cli("export", "small", "--to", "s3://exports/final/model.pt", runs_dir=runs_dir,
                  env=TEST_CREDENTIALS, check=True).stdout
    assert str(runs_dir / "small" / "model.pt") in out
    exported = _read(server, "exports/final/model.pt")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert not (REPO / "s3:").exists(), "the URI was taken for a local path"
