"""Query selection: which training images go to the annotator next (docs/methods.md, "Query
selection")."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.special import xlogy

from xbl.config import QueryConfig

# query.strategy: one of these per-image scores, or "cluster" (xbl/config.py lists both)
STRATEGIES = ("entropy", "least_confidence", "margin", "random", "confident_mistakes")


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """H = -sum_k p_k log p_k per row; xlogy makes 0 log 0 = 0 instead of NaN."""
    return -xlogy(probs, probs).sum(axis=-1)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs.max(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """top1 - top2: small means the model hesitates between two classes."""
    if probs.shape[-1] < 2:
        return probs.max(axis=-1)
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def _available(n: int, exclude: np.ndarray | Iterable[int] | None) -> np.ndarray:
    """Boolean mask of pool images not yet annotated; exclude is a mask or a list of indices."""
    available = np.ones(n, dtype=bool)
    if exclude is None:
        return available
    exclude = np.asarray(exclude if isinstance(exclude, np.ndarray) else list(exclude))
    if exclude.dtype == bool:
        if exclude.shape != (n,):
            raise ValueError(f"exclude mask has shape {exclude.shape}, expected ({n},)")
        return ~exclude
    available[exclude.astype(np.int64)] = False
    return available


def select_queries(
    probs: np.ndarray,
    labels: np.ndarray | None,
    k: int,
    strategy: str,
    exclude: np.ndarray | Iterable[int] | None = None,
    seed: int = QueryConfig.seed,
) -> np.ndarray:
    """Indices of the k most informative pool images, most informative first.

    Already-annotated images (exclude) are skipped; k beyond the pool returns all available.
    Ties keep pool order so the same predictions always give the same queries.
    """
    if strategy == "cluster":
        raise ValueError("strategy 'cluster' ranks explanation clusters: use cluster_queries")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown query strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    probs = np.asarray(probs, dtype=np.float64)
    k = max(int(k), 0)
    candidates = np.flatnonzero(_available(len(probs), exclude))
    if strategy == "random":
        return np.random.default_rng(seed).permutation(candidates)[:k]
    if strategy == "confident_mistakes":
        if labels is None:
            raise ValueError("strategy 'confident_mistakes' needs the labels")
        wrong = probs.argmax(axis=1) != np.asarray(labels)
        candidates = candidates[wrong[candidates]]
    informativeness = {
        "entropy": predictive_entropy,
        "least_confidence": least_confidence,
        "margin": lambda p: -margin(p),
        # the paper's variant: mistakes the model is sure about are the likeliest shortcuts
        "confident_mistakes": lambda p: -predictive_entropy(p),
    }[strategy](probs[candidates])
    order = np.argsort(-informativeness, kind="stable")
    return candidates[order][:k]
