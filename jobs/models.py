"""Models, free of distributed code (parallelism is applied by `jobs.parallel.parallelize`).

The VGG family reproduces torchvision's module layout, so state-dict keys (`features.N.*`,
`classifier.N.*`) match torchvision's checkpoints and their weights load directly; `width`,
`hidden` and `pool_size` shrink it to run on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from jobs.targets import checked_module, resolve
from jobs.schema import ModelConfig

VGG_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.features, channels = _vgg_features(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d((cfg.pool_size, cfg.pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(channels * cfg.pool_size ** 2, cfg.hidden), nn.ReLU(True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg_features(cfg: ModelConfig) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    channels = cfg.in_channels
    for item in VGG_LAYERS[cfg.variant]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        width = max(1, round(int(item) * cfg.width))
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*layers), channels


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class SmallCNN(nn.Module):
    """A quick CNN for the 8x8 digits: the smoke-test model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, 16, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
        )
        side = cfg.image_size // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(True), nn.Dropout(cfg.dropout),
            nn.Linear(64, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg(cfg: ModelConfig) -> nn.Module:
    """The built-in entry `jobs.models:vgg` (`model.name: vgg`): built-in entries take their section."""
    return VGG(cfg)


def cnn(cfg: ModelConfig) -> nn.Module:
    """The built-in entry `jobs.models:cnn` (`model.name: cnn`)."""
    return SmallCNN(cfg)


def build_model(cfg: ModelConfig, src: str = "recipe") -> nn.Module:
    """The model `model.target` (called with `model.kwargs`) or the built-in family builds; `src` names
    the recipe in errors."""
    key = "model.target" if cfg.target else "model.name"
    factory = resolve(src, key, cfg.factory)
    return checked_module(src, key, cfg.factory, factory(**cfg.kwargs) if cfg.target else factory(cfg))


def head_prefix(model: nn.Module) -> str:
    """Name of the final classifier layer, the one replaced when fine-tuning on other classes."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return last + "."


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Turn off gradients for parameters under the given name prefixes; returns how many tensors."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{type(model).__name__}: {total:,} parameters ({trainable:,} trainable), "
            f"{total * 4 / 2 ** 20:.2f} MB as float32")
