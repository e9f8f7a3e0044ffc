"""Paired evidence that a candidate is right more often than the champion on the same images
(docs/methods.md, "Promotion"): the exact McNemar test and a paired bootstrap interval.

Comparing two accuracies unpaired, on a few hundred images every round, lets chance promote a
model that is no better (the champion's figure drifts upward: winner's curse). Pairing by image
looks only at the images where the two models disagree."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


@dataclass(frozen=True)
class PairedComparison:
    images: int
    champion_accuracy: float
    candidate_accuracy: float
    gained: int  # images the candidate gets right and the champion wrong
    lost: int  # images the champion gets right and the candidate wrong
    p_value: float  # one-sided: the candidate is not better
    ci_low: float  # paired bootstrap interval of candidate − champion accuracy
    ci_high: float

    @property
    def difference(self) -> float:
        return self.candidate_accuracy - self.champion_accuracy

    def summary(self) -> str:
        return (
            f"{self.candidate_accuracy:.3f} against the champion's {self.champion_accuracy:.3f} "
            f"on {self.images} images ({self.difference:+.3f}, 95 % CI "
            f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}]; {self.gained} gained, {self.lost} lost, "
            f"McNemar p = {self.p_value:.3g})"
        )


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact one-sided McNemar: P(at least `gained` of the discordant images go the candidate's
    way) when either model is equally likely to win each. No discordant image: p = 1."""
    n = gained + lost
    return 1.0 if n == 0 else float(binom.sf(gained - 1, n, 0.5))


def paired_bootstrap_ci(
    champion_correct: np.ndarray,
    candidate_correct: np.ndarray,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the accuracy difference, resampling images (both models' answers
    on an image stay together)."""
    diff = np.asarray(candidate_correct, float) - np.asarray(champion_correct, float)
    if len(diff) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def compare_paired(champion_correct: np.ndarray, candidate_correct: np.ndarray) -> PairedComparison:
    """Both models' per-image correctness on the same images, in the same order."""
    a = np.asarray(champion_correct, dtype=bool)
    b = np.asarray(candidate_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.shape} vs {b.shape}")
    gained, lost = int((b & ~a).sum()), int((a & ~b).sum())
    low, high = paired_bootstrap_ci(a, b)
    return PairedComparison(
        images=len(a),
        champion_accuracy=float(a.mean()) if len(a) else float("nan"),
        candidate_accuracy=float(b.mean()) if len(b) else float("nan"),
        gained=gained,
        lost=lost,
        p_value=mcnemar_p(gained, lost),
        ci_low=low,
        ci_high=high,
    )
