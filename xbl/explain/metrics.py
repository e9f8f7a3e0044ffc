"""Explanation metrics (docs/methods.md, "Metrics"): how much attribution falls on the evidence or the shortcut."""

from __future__ import annotations

import numpy as np


def _per_image(a) -> np.ndarray:
    """torch or numpy, (N,...) or a single (H,W) map -> float (N, pixels)."""
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    a = a.astype(np.float64)
    a = a[None] if a.ndim == 2 else a
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))  # -1 fails on an empty batch


def activation_recall(G, M) -> np.ndarray:
    """AR = sum(M * G) / sum(M) per image (eXBL): how much of the evidence the map covers.

    NaN where M is empty: with no marked evidence there is nothing to recall.
    """
    G, M = _per_image(G), _per_image(M)
    evidence = M.sum(axis=1)
    return np.divide((M * G).sum(axis=1), evidence, out=np.full(len(M), np.nan), where=evidence > 0)


def dead_maps(A) -> np.ndarray:
    """Per image: the map is all zero or holds a non-finite value. Such a map explains nothing,
    so no score may call it right (a dead map would otherwise put no share on the shortcut)."""
    A = _per_image(A)
    return ~np.isfinite(A).all(axis=1) | ~(np.abs(A) > 0).any(axis=1)


def wrong_reason_share(A, W_true) -> np.ndarray:
    """sum(W_true * |A|) / sum(|A|) per image: the share of attribution on the known confounder.

    NaN where the map is dead (`dead_maps`): a map that points nowhere is not a right reason.
    """
    dead = dead_maps(A)
    A, W_true = np.abs(np.nan_to_num(_per_image(A))), _per_image(W_true)
    total = A.sum(axis=1)
    share = np.divide((W_true * A).sum(axis=1), total, out=np.zeros(len(A)), where=total > 0)
    return np.where(dead, np.nan, share)


def outside_share(A, M) -> np.ndarray:
    """sum(~M * |A|) / sum(|A|) per image: the share of attribution off the marked evidence.

    NaN where M is empty or covers the whole image (no mask says nothing about where the
    evidence is not), and where the map is dead (`dead_maps`).
    """
    dead = dead_maps(A)
    A, M = np.abs(np.nan_to_num(_per_image(A))), _per_image(M) > 0
    total, covered = A.sum(axis=1), M.mean(axis=1)
    share = np.divide((~M * A).sum(axis=1), total, out=np.zeros(len(A)), where=total > 0)
    return np.where((covered > 0) & (covered < 1) & ~dead, share, np.nan)
