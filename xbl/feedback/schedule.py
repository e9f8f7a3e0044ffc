"""What annotators said, as training uses it: the `Feedback` a retraining draws its annotated
images from, and λ, the weight on its term (docs/methods.md, "Feedback losses").

λ is worked out here and nowhere else: the method's λ under the settings (`method_lambda`,
also what a run logs), its normalisation on a first batch (`Feedback.normalised_lambda`) and
the weight of the term on a step that carries it (`Feedback.step_weight`). The training loop
only keeps the λ in use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from xbl.feedback.methods import METHODS, AnnotatedImages, FeedbackMethod, method_for

LAMBDA_PER_BATCH = 16  # the summed terms' λ is set as for this many annotated images a step


def method_lambda(cfg: FeedbackConfig, method: str | None = None) -> float:
    """λ for `method` (by default the chosen one): its value under feedback.lambda, else the
    method's own default λ."""
    method = method or cfg.method
    return float(cfg.lambda_.get(method, METHODS[method].default_lambda))


@dataclass
class Feedback:
    """The annotated images and the method that learns from them.

    Every `every`-th step gets `per_batch` of these mixed in, so a handful of annotations act
    throughout training, with the term weighted so that its expected gradient depends on
    neither setting while its cost does (`step_weight`; docs/methods.md, "Feedback cost").
    `normalize_lambda` rescales λ at the first batch with a nonzero term (`normalised_lambda`),
    so that the term starts at λ times the cross-entropy; it is meant for fine-tuning a trained
    model (from a fresh start the term is near zero at first and the rescaled λ would be huge).
    """

    method: FeedbackMethod
    images: AnnotatedImages
    lam: float
    normalize_lambda: bool
    per_batch: int
    every: int

    def normalised_lambda(self, ce: float, term: float) -> float:
        """λ rescaled on a batch whose cross-entropy is `ce` and whose unweighted term is
        `term` (> 0), so that the term starts at λ times the cross-entropy."""
        return self.lam * ce / term

    def step_weight(self, lam: float) -> float:
        """The term's weight on a step that carries it: λ·every; and for a term that sums over
        the drawn images (the RRR terms), also · min(16, n) / min(per_batch, n) for n annotated
        images, so λ means what it means at 16 images a step whatever `per_batch` is (with
        fewer than 16 annotated, 16 a step meant all of them). A normalised λ was measured on
        the drawn images themselves and needs no such factor."""
        images = 1.0
        if self.method.sums_over_images and not self.normalize_lambda:
            n = len(self.images)
            images = min(LAMBDA_PER_BATCH, n) / max(min(self.per_batch, n), 1)
        return lam * self.every * images

    def to(self, device: torch.device) -> Feedback:
        """A copy with the images on `device` (annotations are few: they move once)."""
        method = copy.copy(self.method)
        if getattr(method, "exemplars", None) is not None:
            method.exemplars = tuple(e.to(device) for e in method.exemplars)
        return replace(self, method=method, images=self.images.to(device))

    def draw(self, gen: torch.Generator) -> AnnotatedImages:
        """The annotated images of one step: `per_batch` of them, at random."""
        idx = torch.randperm(len(self.images), generator=gen)[: self.per_batch]
        return self.images.take(idx.to(self.images.y.device))


def build_feedback(
    cfg: FeedbackConfig,
    data: PreparedData,
    indices: np.ndarray,
    W: np.ndarray,
    seed: int,
    model: nn.Module | None = None,
    ratings: dict[int, str] | None = None,
    keep: np.ndarray | None = None,
) -> Feedback:
    """Feedback on the annotated training images `indices` with their ignore masks W (n,H,W)
    and keep masks (n,H,W: what annotators affirmed as evidence; None = nothing kept).

    The evidence mask M is what annotators kept minus what they said to ignore. It never comes
    from `data.relevance`: real users have no relevance masks, and a perfect mask for every
    queried image would credit HINT and eXBL with evidence nobody gave (the metrics still use
    it). `model` is the one annotators judged; only methods with `needs_model` use it.
    """
    indices, W = np.asarray(indices), np.asarray(W, dtype=bool)
    keep = np.zeros_like(W) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != W.shape:
        raise ValueError(f"keep masks {keep.shape} do not match the ignore masks W {W.shape}")
    images = AnnotatedImages(
        to_tensor(data.images[indices]),
        torch.from_numpy(data.labels[indices]),
        torch.from_numpy(W).float(),
        torch.from_numpy(keep & ~W).float(),
    )
    method = method_for(cfg)
    images = method.prepare(images, model, ratings or {}, seed)
    return Feedback(
        method, images, method_lambda(cfg), cfg.normalize_lambda, cfg.per_batch, cfg.every
    )


def retraining_schedule(train: TrainConfig, feedback: FeedbackConfig) -> TrainConfig:
    """Train settings for a feedback retraining: the feedback's epochs and learning rate on a
    fixed schedule (early stopping on the confounded val split would pick the shortcut back)."""
    return replace(train, epochs=feedback.epochs, lr=feedback.lr, patience=0)
