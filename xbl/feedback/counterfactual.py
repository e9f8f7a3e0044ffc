"""Counterfactual images: a marked confounder region replaced by content that carries no label.

One replacement serves both the judge's counterfactual audit (xbl/judge/evidence.py) and
counterfactual training data. The region is first grown to whole cells of the annotation grid,
then filled from the image's own surround (a normalised convolution: a Gaussian average of the
unmarked pixels only). A flat colour in the mark's exact outline would keep its silhouette, and
on decoy-lesions the shape of the mark (patch or ruler) codes the label as well as its colour;
a cell-shaped, smooth fill keeps neither.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def to_cells(masks: np.ndarray, cell: int) -> np.ndarray:
    """(N,H,W) bool: every grid cell the mask touches, whole."""
    m = np.asarray(masks, dtype=bool)
    n, h, w = m.shape
    gh, gw = -(-h // cell), -(-w // cell)
    padded = np.zeros((n, gh * cell, gw * cell), dtype=bool)
    padded[:, :h, :w] = m
    touched = padded.reshape(n, gh, cell, gw, cell).any(axis=(2, 4))
    return touched.repeat(cell, axis=1).repeat(cell, axis=2)[:, :h, :w]


def fill_from_surround(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(C,H,W) uint8 with `region` (H,W) replaced by a smooth fill from the unmarked pixels.
    The blur widens until every marked pixel has unmarked pixels in reach; an image marked
    everywhere keeps its mean."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return image.copy()
    keep = (~region).astype(np.float64)
    pixels = image.astype(np.float64)
    if not keep.any():
        return np.broadcast_to(pixels.mean(axis=(1, 2), keepdims=True), image.shape).astype(
            image.dtype
        )
    out = pixels.copy()
    todo = region.copy()
    sigma = 1.0
    while todo.any():
        weight = gaussian_filter(keep, sigma, mode="reflect")
        reached = todo & (weight > 1e-3)
        for c in range(len(pixels)):
            mean = gaussian_filter(pixels[c] * keep, sigma, mode="reflect") / np.maximum(
                weight, 1e-12
            )
            out[c][reached] = mean[reached]
        todo &= ~reached
        sigma *= 2
    return np.clip(np.rint(out), 0, 255).astype(image.dtype)


def counterfactual_images(
    images: np.ndarray, masks: np.ndarray, cell: int, donors: np.ndarray | None = None
) -> np.ndarray:
    """(N,C,H,W) uint8 images with each mask's cells filled from the image's surround; with
    `donors` (N,) positions into the same images, the donor's own marked cells are then
    pasted where they were in the donor. A donor drawn without regard to the label gives each
    image a shortcut that carries no label, as an audit split's randomised decoys do; removing
    the shortcut alone tests a model on images the shortcut never left empty."""
    regions = to_cells(masks, cell)
    out = np.stack([fill_from_surround(img, reg) for img, reg in zip(images, regions)])
    if donors is not None:
        for i, j in enumerate(donors):
            out[i][:, regions[j]] = images[j][:, regions[j]]
    return out
