"""The grid over a saliency map: cells ranked by mean attribution, and cells back to pixel masks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def cell_scores(attr: torch.Tensor, cell: int) -> torch.Tensor:
    """Mean attribution per cell x cell block: (N,H,W) -> (N, H//cell, W//cell)."""
    attr = torch.as_tensor(attr).float()
    return F.avg_pool2d(attr.unsqueeze(1), kernel_size=cell)[:, 0]


def top_cells(attr: torch.Tensor, cell: int, k: int, signed: bool = False) -> torch.Tensor:
    """(row, col) of the k cells with the largest |mean attribution|, best first: (N, k, 2).

    Ranked by magnitude: a cell the model weighs *against* its predicted class is still a
    cell it looks at. A label-coded shortcut such as the decoy patch often gets a negative
    DeepLIFT score for the predicted logit (its value rules the other classes out), and a
    signed ranking hides it in about half of the images. `signed=True` ranks by the signed
    mean (the paper's choice); for non-negative maps (GradCAM) both agree.
    k is capped at the number of cells. topk returns cell indices directly; the paper's code
    ranked with argsort(argsort(.)), which yields ranks, not the cells.
    """
    scores = cell_scores(attr, cell)
    if not signed:
        scores = scores.abs()
    n_cols = scores.shape[-1]
    k = min(k, scores[0].numel())
    best = scores.flatten(1).topk(k, dim=1).indices
    return torch.stack([best // n_cols, best % n_cols], dim=-1)


def cells_to_mask(
    cells: torch.Tensor | np.ndarray | Iterable[tuple[int, int]], cell: int, height: int, width: int
) -> np.ndarray:
    """Boolean (H, W) mask that is True inside every given (row, col) cell."""
    mask = np.zeros((height, width), dtype=bool)
    for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2):
        if not (0 <= row * cell < height and 0 <= col * cell < width):
            raise ValueError(f"cell ({row}, {col}) lies outside a {height}x{width} image")
        mask[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = True
    return mask
