"""Classifiers. Every model exposes `last_conv`, the layer GradCAM explains."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head: seconds per epoch on a CPU for 28x28 inputs."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.last_conv = self.features[3]
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


MODELS = {"small_cnn": SmallCNN}


def build_model(name: str, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, n_classes=n_classes, image_size=image_size)
