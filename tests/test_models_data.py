"""Tier 1: models, data sets, schedules and sampling, in-process."""
from __future__ import annotations

import io
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from conftest import run_cli
from jobs.data import ImageFolder, build_datasets
from jobs.models import build_model, freeze, summary
from jobs.pretrained import load_pretrained
from jobs.storage import filesystem
from jobs.training.schedule import lr_multiplier
from jobs.training.step import micro_batches
from s3_server import S3Server, s3_env, s3_server_fixture  # noqa: F401  (s3_env is a fixture)
from jobs.schema import DataConfig, ModelConfig, ScheduleConfig, StorageConfig

s3_server = pytest.fixture(scope="module")(s3_server_fixture)

# torchvision's vgg11: conv layers at these feature indices, classifier Linear at 0, 3, 6
VGG11_KEYS = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13, 16, 18) for p in ("weight", "bias")] + \
             [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]


def test_vgg_matches_torchvision_layout() -> None:
    model = build_model(ModelConfig(name="vgg", variant="vgg11", num_classes=1000))
    state = model.state_dict()
    assert list(state) == VGG11_KEYS
    assert sum(p.numel() for p in model.parameters()) == 132_863_336  # torchvision's vgg11
    assert state["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    vgg16 = build_model(ModelConfig(name="vgg", variant="vgg16", num_classes=1000))
    assert sum(p.numel() for p in vgg16.parameters()) == 138_357_544  # torchvision's vgg16
    bn = build_model(ModelConfig(name="vgg", variant="vgg11", batch_norm=True, width=0.25, hidden=32, pool_size=1))
    assert "features.1.running_mean" in bn.state_dict()  # vgg11_bn: BatchNorm right after each conv


def test_vgg_scales_down_and_runs() -> None:
    cfg = ModelConfig(name="vgg", width=0.25, hidden=64, pool_size=2, image_size=32, num_classes=5)
    model = build_model(cfg)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert list(model.state_dict()) == VGG11_KEYS


def test_summary_reports_float32_megabytes() -> None:
    assert summary(nn.Linear(601_808, 1)).endswith("601,809 parameters (601,809 trainable), 2.30 MB as float32")


def test_freeze_by_prefix() -> None:
    model = build_model(ModelConfig(name="vgg", width=0.125, hidden=16, pool_size=1, image_size=32))
    assert freeze(model, ("features.0", "features.3")) == 4
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"}


def test_pretrained_loads_prefixed_torchvision_style_and_replaces_head(tmp_path: Path) -> None:
    cfg = ModelConfig(name="vgg", width=0.125, hidden=16, pool_size=1, image_size=32, num_classes=7)
    source = build_model(cfg)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # as DDP saves it
    target = build_model(ModelConfig(**{**cfg.__dict__, "num_classes": 3}))
    message = load_pretrained(target, str(path), True, StorageConfig())
    assert "20 tensors loaded" in message and "classifier.6 re-initialised" in message
    assert torch.equal(target.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"])
    assert target.state_dict()["classifier.6.weight"].shape == (3, 16)
    wrong = build_model(ModelConfig(**{**cfg.__dict__, "hidden": 32}))
    with pytest.raises(ValueError, match="do not fit the model"):
        load_pretrained(wrong, str(path), True, StorageConfig())


def test_digits_data_shapes_and_class_subset() -> None:
    model = ModelConfig(name="vgg", in_channels=3, image_size=32, num_classes=5)
    train, val = build_datasets(DataConfig(name="digits", classes=(5, 6, 7, 8, 9)), model)
    x, y = train[0]
    assert x.shape == (3, 32, 32)
    labels = {int(val[i][1]) for i in range(len(val))} | {int(train[i][1]) for i in range(len(train))}
    assert labels == {0, 1, 2, 3, 4}
    assert 850 < len(train) + len(val) < 950  # about half of the 1,797 digits
    full_train, full_val = build_datasets(DataConfig(name="digits"), ModelConfig(in_channels=1, image_size=8))
    assert len(full_train) + len(full_val) == 1797 and len(full_val) == 359


def _write_image_folder(fs: fsspec.AbstractFileSystem, root: str) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(12):
        label = int(digits.target[i]) % 3
        img = Image.fromarray((digits.images[i] * 15).astype(np.uint8)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        fs.makedirs(f"{root}/class{label}", exist_ok=True)
        fs.pipe(f"{root}/class{label}/{i}.png", buf.getvalue())


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_image_folder_local_and_fsspec(tmp_path: Path, scheme: str) -> None:
    root = str(tmp_path / "imgs") if scheme == "local" else "memory://imgs-test"
    fs, path = fsspec.core.url_to_fs(root)
    _write_image_folder(fs, path)
    data = ImageFolder(root, image_size=16, channels=3)
    assert data.classes == ["class0", "class1", "class2"] and len(data) == 12
    x, y = data[0]
    assert x.shape == (3, 16, 16) and y in (0, 1, 2) and x.std() > 0


@pytest.mark.slow  # a moto server on loopback (tier 2)
def test_image_folder_on_s3_reads_through_the_storage_endpoint(s3_server: S3Server, s3_env: dict[str, str]) -> None:
    """The endpoint is in the cluster's `storage:` section only (s3_env leaves no AWS_ENDPOINT_URL), as for
    checkpoints; the image folder used to ignore it and ask AWS itself."""
    s3_server.create_bucket("images")
    storage = StorageConfig(endpoint_url=s3_server.endpoint)
    fs, path = filesystem("s3://images/digits", storage)
    _write_image_folder(fs, path)
    train, val = build_datasets(DataConfig(name="image_folder", root="s3://images/digits"),
                                ModelConfig(in_channels=3, image_size=16, num_classes=3), storage)
    assert len(train) + len(val) == 12 and train.dataset.classes == ["class0", "class1", "class2"]
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1, 2) and x.std() > 0


@pytest.mark.slow  # a training run through the real CLI
def test_run_on_an_s3_image_folder_uses_the_clusters_endpoint(s3_server: S3Server, s3_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    s3_server.create_bucket("run-images")
    fs, path = filesystem("s3://run-images/digits", StorageConfig(endpoint_url=s3_server.endpoint))
    _write_image_folder(fs, path)
    cluster = tmp_path / "s3.yaml"
    cluster.write_text(f"backend: local\nstorage:\n  endpoint_url: {s3_server.endpoint}\n")
    proc = run_cli("launch", "digits", "data.name=image_folder", "data.root=s3://run-images/digits",
                   "model.num_classes=3", "parallel.procs_per_node=1", "trainer.epochs=null", "trainer.max_steps=2",
                   "trainer.global_batch=4", "trainer.micro_batch=4", "--cluster", str(cluster), "--run-name", "s3img",
                   runs_dir=tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed at step 2" in proc.stdout


def test_lr_warmup_then_cosine_and_step() -> None:
    f = lr_multiplier(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), total_steps=14)
    assert [round(f(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    g = lr_multiplier(ScheduleConfig(name="step", warmup_steps=0, step_size=3, gamma=0.5), total_steps=10)
    assert [g(s) for s in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]


class _Index(Dataset):
    def __len__(self) -> int:
        return 103

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(i), i


def _epoch_indices(rank: int, epoch: int, skip: int = 0) -> list[int]:
    sampler = DistributedSampler(_Index(), num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(epoch)
    steps = len(sampler) // 10
    return [int(i) for step in micro_batches(_Index(), sampler, skip, steps, 5, 2, 0) for x, _ in step for i in x]


def test_every_sample_once_per_epoch_across_ranks() -> None:
    for epoch in (0, 1):
        seen = _epoch_indices(0, epoch) + _epoch_indices(1, epoch)
        assert len(seen) == len(set(seen)) == 100  # 103 samples, 2 ranks x 5 steps x 10 per step
    assert _epoch_indices(0, 0) != _epoch_indices(0, 1)  # set_epoch reshuffles


def test_mid_epoch_skip_continues_the_same_order() -> None:
    assert _epoch_indices(1, 2, skip=3) == _epoch_indices(1, 2)[30:]


def test_digits_read_directly_match_sklearn() -> None:
    from sklearn.datasets import load_digits

    from jobs.data import digits_arrays

    pixels, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(labels, bunch.target)
