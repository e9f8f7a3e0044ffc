"""Small models with known explanations, shared by the loss and saliency tests."""

from __future__ import annotations

import torch
from torch import nn


class CornerNet(nn.Module):
    """Logits depend only on the top-left 4x4 patch, so GradCAM (positive weights: nonzero
    wherever activations are) lives in the top-left corner."""

    def __init__(self, n_classes: int = 3, size: int = 28):
        super().__init__()
        corner = torch.zeros(1, 1, size, size)
        corner[..., :4, :4] = 1.0
        self.register_buffer("corner", corner)
        self.last_conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * size * size, n_classes)
        with torch.no_grad():
            self.last_conv.weight.fill_(1 / 9)
            self.head.weight.copy_(
                torch.linspace(0.1, 1.0, n_classes)[:, None].expand_as(self.head.weight)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.last_conv(x * self.corner)).flatten(1))
