"""Saliency maps of many pool images: those a query round clusters and the annotator is shown."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xbl.data.images import to_tensor
from xbl.explain.saliency import saliency_map
from xbl.progress import batch_starts


def pool_saliency(
    model: nn.Module,
    images: np.ndarray,
    idx: np.ndarray,
    method: str,
    blur_sigma: float,
    batch: int = 256,
) -> torch.Tensor:
    """Saliency maps (n,H,W) of `images[idx]` (query.saliency, query.blur_sigma); the images
    are read a batch at a time, so a pool on disk never sits in memory whole."""
    maps = [
        saliency_map(model, to_tensor(images[idx[s : s + batch]]), method, blur_sigma)
        for s in batch_starts(len(idx), batch, f"{method} maps of {len(idx)} pool images")
    ]
    return torch.cat(maps) if maps else torch.zeros(0, *images.shape[-2:])
