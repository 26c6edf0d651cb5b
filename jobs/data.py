"""Data sets: scikit-learn's digits (ships inside the package, works offline), an image folder
read with PIL from a local path or any fsspec URI, and synthetic data for fast tests."""
from __future__ import annotations

import importlib.util
import io
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from jobs.storage import filesystem
from jobs.targets import checked_datasets, resolve
from jobs.schema import DataConfig, ModelConfig, StorageConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a stop signal is the rank's to handle, not its workers'. Slurm
    signals every process of a job step (a preemption's USR2, a requeue's TERM) and Ctrl-C reaches
    the whole process group; a worker dying of it makes the rank fail instead of saving. The
    workers still end with their rank (PyTorch's workers watch their parent)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def build_datasets(data: DataConfig, model: ModelConfig, storage: Optional[StorageConfig] = None,
                   src: str = "recipe") -> tuple[Dataset, Dataset]:
    """(train, validation): what `data.target` returns (called with `data.kwargs`), or a built-in data set;
    `src` names the recipe in errors."""
    key = "data.target" if data.target else "data.name"
    factory = resolve(src, key, data.factory)
    made = factory(**data.kwargs) if data.target else factory(data, model, storage)
    return checked_datasets(src, key, data.factory, made)


# The built-in entries (`data.name: digits` is `jobs.data:digits`) take the data and model sections and the
# cluster's `storage:` section, and return (train, validation) shaped for the model: `in_channels` x
# `image_size` x `image_size`. An image folder on S3 is read through the storage section's endpoint,
# region and profile, as checkpoints and pretrained weights are (None: the defaults and AWS variables).
def digits(data: DataConfig, model: ModelConfig, storage: Optional[StorageConfig]) -> tuple[Dataset, Dataset]:
    return _split(_digits(data, model), data)


def synthetic(data: DataConfig, model: ModelConfig, storage: Optional[StorageConfig]) -> tuple[Dataset, Dataset]:
    return _split(_synthetic(data, model), data)


def image_folder(data: DataConfig, model: ModelConfig,
                 storage: Optional[StorageConfig]) -> tuple[Dataset, Dataset]:
    return _split(ImageFolder(data.root or "", model.image_size, model.in_channels, storage), data)


def _split(dataset: Dataset, data: DataConfig) -> tuple[Dataset, Dataset]:
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed)).tolist()
    n_val = max(1, int(n * data.val_fraction))
    return torch.utils.data.Subset(dataset, order[n_val:]), torch.utils.data.Subset(dataset, order[:n_val])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images, pixel values 0..16, labels 0..9), read from the file
    the package ships. Reading it directly skips importing sklearn, which costs every rank ~0.9 s."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(data: DataConfig, model: ModelConfig) -> TensorDataset:
    pixels, targets = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    labels = torch.tensor(targets, dtype=torch.long)
    if data.classes is not None:
        keep = torch.isin(labels, torch.tensor(data.classes))
        images, labels = images[keep], labels[keep]
        relabel = {c: i for i, c in enumerate(data.classes)}
        labels = torch.tensor([relabel[int(y)] for y in labels], dtype=torch.long)
    return TensorDataset(_shape(images.unsqueeze(1), model), labels)


def _shape(images: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Resize to the model's input side, repeat grey to its channels, standardise."""
    if images.shape[-1] != model.image_size:
        images = F.interpolate(images, size=(model.image_size, model.image_size), mode="bilinear",
                               align_corners=False)
    if images.shape[1] != model.in_channels:
        images = images.mean(1, keepdim=True).repeat(1, model.in_channels, 1, 1)
    return ((images - images.mean()) / images.std()).contiguous()


def _synthetic(data: DataConfig, model: ModelConfig) -> TensorDataset:
    """Gaussian images labelled by a fixed random linear teacher: learnable, deterministic."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(data.num_samples, model.in_channels, model.image_size, model.image_size, generator=g)
    teacher = torch.randn(x[0].numel(), model.num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorDataset(x, y)


class ImageFolder(Dataset):
    """One subfolder per class under `root` (a path or fsspec URI); classes sorted by name."""

    def __init__(self, root: str, image_size: int, channels: int, storage: Optional[StorageConfig] = None) -> None:
        self.fs, path = filesystem(root, storage or StorageConfig())
        self.image_size, self.channels = image_size, channels
        folders = sorted(p for p in self.fs.ls(path, detail=False) if self.fs.isdir(p))
        self.classes = [p.rstrip("/").rsplit("/", 1)[-1] for p in folders]
        self.samples: list[tuple[str, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(f for f in self.fs.find(folder) if f.lower().endswith(IMAGE_SUFFIXES))
            self.samples += [(f, label) for f in files]
        if not self.samples:
            raise FileNotFoundError(f"image folder {root!r} holds no images in class subfolders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with self.fs.open(path, "rb") as f:
            image = Image.open(io.BytesIO(f.read())).convert("RGB" if self.channels == 3 else "L")
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div_(255.0)
        pixels = pixels.view(self.image_size, self.image_size, self.channels).permute(2, 0, 1)
        return (pixels - 0.5) / 0.25, label


