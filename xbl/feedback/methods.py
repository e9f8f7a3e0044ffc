"""Feedback methods: one class each, found in one registry (docs/methods.md, "Feedback losses").

A method knows four things: its term L_expl on a step's annotated images, how it prepares the
annotated images before training (counterexamples add images, eXBL fixes its exemplars), how
its term splits across data-parallel processes, and its default λ. Adding a method is one
subclass decorated with `@register`; `feedback.method: <its name>` then selects it (a
built-in method also lists its name in xbl/config.py, so that the settings are checked without
torch; a test says when it is missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from xbl.config import FEEDBACK_METHODS, FeedbackConfig
from xbl.feedback.losses import (
    counterexamples,
    exbl_triplet,
    explanation,
    hint_penalty,
    rrr_g_penalty,
    rrr_penalty,
    rrr_penalty_and_logits,
    select_exemplars,
)


@dataclass(frozen=True)
class AnnotatedImages:
    """Annotated images and what annotators said: W (N,H,W) 1 where the model must not look,
    M (N,H,W) 1 where the evidence is: what the annotator kept as "model attention" minus W
    (`build_feedback`); empty for an image where the annotator kept nothing."""

    x: torch.Tensor
    y: torch.Tensor
    W: torch.Tensor
    M: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> AnnotatedImages:
        return AnnotatedImages(*(t.to(device) for t in (self.x, self.y, self.W, self.M)))

    def take(self, idx: torch.Tensor) -> AnnotatedImages:
        return AnnotatedImages(self.x[idx], self.y[idx], self.W[idx], self.M[idx])

    def part(self, rank: int, world: int) -> AnnotatedImages:
        """Contiguous slice `rank` of `world` (uneven sizes allowed; a slice may be empty)."""
        return AnnotatedImages(
            *(torch.tensor_split(t, world)[rank] for t in (self.x, self.y, self.W, self.M))
        )


class FeedbackMethod:
    """The base: a term that sums over the annotated images (so a process's slice contributes
    its own sum), with no preparation. Subclasses set `name` and `default_lambda` (the built-in
    methods': the λ their audit recovery was best at, bench/results/efficacy.md)."""

    name: ClassVar[str]
    default_lambda: ClassVar[float]
    needs_model: ClassVar[bool] = False  # prepare() uses the model the annotators judged
    # the term is a sum over the drawn images (it grows with `per_batch`), not a mean
    sums_over_images: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: FeedbackConfig) -> FeedbackMethod:
        """The method with its settings from `cfg`, the `feedback` section."""
        return cls()

    def prepare(
        self, images: AnnotatedImages, model: nn.Module | None, ratings: dict[int, str], seed: int
    ) -> AnnotatedImages:
        """The annotated images training will draw from (by default: as annotated)."""
        return images

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        raise NotImplementedError

    def term_and_logits(
        self, model: nn.Module, batch: AnnotatedImages
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The term, and the batch's logits where its own forward pass gave them (by default
        it gives none)."""
        return self.term(model, batch), None

    def loss(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        """L_expl on `batch` (a scalar; zero for an empty batch)."""
        return self.loss_and_logits(model, batch)[0]

    def loss_and_logits(
        self, model: nn.Module, batch: AnnotatedImages
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """L_expl on `batch`, and the batch's logits where the term's own forward pass gave
        them (with their graph), so that the step need not run these images again for their
        cross-entropy; None where it did not, and for an empty batch (whose term is zero)."""
        if len(batch) == 0:
            return batch.x.new_zeros(()), None
        return self.term_and_logits(model, batch)

    def share(
        self, model: nn.Module, batch: AnnotatedImages, rank: int, world: int
    ) -> torch.Tensor:
        """Process `rank`'s part of the term on the step's batch: summed over the processes it
        is the term on the whole batch, and so are the gradients."""
        return self.loss(model, batch.part(rank, world))

    def state(self) -> dict:
        """What rebuilds this method in a data-parallel worker (plain values and tensors)."""
        return {}

    @classmethod
    def from_state(cls, state: dict) -> FeedbackMethod:
        return cls(**state)


METHODS: dict[str, type[FeedbackMethod]] = {}


def register(cls: type[FeedbackMethod]) -> type[FeedbackMethod]:
    """Make a method selectable as `feedback.method: <cls.name>`. The config checks names
    against its own list, which holds the built-in methods without importing torch; a method
    registered elsewhere joins that list here."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a feedback method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    if cls.name not in FEEDBACK_METHODS:
        FEEDBACK_METHODS.append(cls.name)
    return cls


def method_for(cfg: FeedbackConfig) -> FeedbackMethod:
    """The method `cfg` (the `feedback` section) names, with its settings."""
    return METHODS[cfg.method].from_config(cfg)


@register
class RRR(FeedbackMethod):
    """Right for the right reasons: Σ W·(∂ Σ_k log p_k / ∂x)², by double backpropagation."""

    name, default_lambda = "rrr", 0.1
    variant = "logp"
    sums_over_images = True

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        return rrr_penalty(model, batch.x, batch.W, variant=self.variant)

    def term_and_logits(
        self, model: nn.Module, batch: AnnotatedImages
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return rrr_penalty_and_logits(model, batch.x, batch.W, variant=self.variant)


@register
class RRROutput(RRR):
    """RRR on the summed logits Σ_k z_k instead of the log-probabilities."""

    name, default_lambda = "rrr_output", 100.0
    variant = "output"


@register
class RRRG(FeedbackMethod):
    """RRR-G: Σ (W max-pooled to the GradCAM map · the predicted class's GradCAM)²."""

    name, default_lambda = "rrr_g", 0.01
    sums_over_images = True

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        return rrr_g_penalty(model, batch.x, batch.W)


@register
class HINT(FeedbackMethod):
    """HINT-style: MSE of the true-class GradCAM against M, the evidence the annotator kept,
    over the images with a nonempty M: an image where nothing was kept adds no term."""

    name, default_lambda = "hint", 1.0

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        return hint_penalty(model, batch.x, batch.y, batch.M)

    def share(
        self, model: nn.Module, batch: AnnotatedImages, rank: int, world: int
    ) -> torch.Tensor:
        """An MSE over the masked images: each slice weighted by its share of them."""
        local = batch.part(rank, world)
        n_all = int(batch.M.flatten(1).any(1).sum())
        n_here = int(local.M.flatten(1).any(1).sum())
        if not n_here:
            return local.x.new_zeros(())
        return self.loss(model, local) * (n_here / n_all)


@register
class EXBL(FeedbackMethod):
    """eXBL triplet on e(x) = x·GradCAM(x) against a good and a bad exemplar explanation: the
    annotators' "good" and "bad" ratings, else activation recall against M, the evidence they
    kept."""

    name, default_lambda = "exbl", 1.0
    needs_model = True

    def __init__(
        self,
        margin: float = FeedbackConfig.exbl_margin,
        exemplars: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.margin, self.exemplars = margin, exemplars

    @classmethod
    def from_config(cls, cfg: FeedbackConfig) -> EXBL:
        return cls(margin=cfg.exbl_margin)

    def prepare(
        self, images: AnnotatedImages, model: nn.Module | None, ratings: dict[int, str], seed: int
    ) -> AnnotatedImages:
        """Fix this method's exemplars (it keeps them: `self.exemplars`) from the judged model:
        rated explanations when annotators rated both kinds, else those of maximal and minimal
        activation recall. The images stay as they are."""
        if model is None:
            raise ValueError("eXBL needs the model the annotators judged to fix its exemplars")
        device = next(model.parameters()).device
        x, y = images.x.to(device), images.y.to(device)
        good = [i for i, r in ratings.items() if r == "good"]
        bad = [i for i, r in ratings.items() if r == "bad"]
        if not (good and bad) and not images.M.any():
            raise ValueError(
                "eXBL cannot fix its exemplars: the ratings lack a 'good' or a 'bad' "
                "explanation, and no annotator kept any evidence ('model attention') to rank by"
            )
        pair = (
            (good[0], bad[0])
            if good and bad
            else select_exemplars(model, x, y, images.M.to(device))
        )
        self.exemplars = tuple(
            explanation(model, x[[i]], y[[i]], create_graph=False).detach() for i in pair
        )
        return images

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        exemplars = self.exemplars
        if exemplars is None:  # the batch's own best and worst images as anchors
            if not batch.M.flatten(1).any():
                return batch.x.new_zeros(())  # no relevance marked anywhere: nothing to learn
            pair = select_exemplars(model, batch.x, batch.y, batch.M)
            # anchors are fixed for this step, like labels: no gradient through them
            exemplars = tuple(
                explanation(model, batch.x[[i]], batch.y[[i]], create_graph=False).detach()
                for i in pair
            )
        return exbl_triplet(model, batch.x, batch.y, *exemplars, margin=self.margin)

    def share(
        self, model: nn.Module, batch: AnnotatedImages, rank: int, world: int
    ) -> torch.Tensor:
        """A mean over the images: each slice weighted by its share. Without fixed exemplars
        the anchors come from the whole batch, which does not split, so every process
        computes the whole term (annotated images are few; the CE part still splits)."""
        if self.exemplars is None:
            return self.loss(model, batch) / world
        local = batch.part(rank, world)
        return self.loss(model, local) * (len(local) / len(batch))

    def state(self) -> dict:
        return {"margin": self.margin, "exemplars": self.exemplars}

    @classmethod
    def from_state(cls, state: dict) -> EXBL:
        exemplars = state.get("exemplars")
        return cls(state["margin"], tuple(exemplars) if exemplars is not None else None)


@register
class Counterexamples(FeedbackMethod):
    """No loss term: noisy copies of each annotated image, its W region replaced by noise and
    its label kept, join the annotated images."""

    name, default_lambda = "counterexamples", 0.0

    def __init__(self, copies: int = FeedbackConfig.counterexample_copies):
        self.copies = copies

    @classmethod
    def from_config(cls, cfg: FeedbackConfig) -> Counterexamples:
        return cls(copies=cfg.counterexample_copies)

    def prepare(
        self, images: AnnotatedImages, model: nn.Module | None, ratings: dict[int, str], seed: int
    ) -> AnnotatedImages:
        gen = torch.Generator().manual_seed(seed)
        W = images.W.bool()
        x_new, y_new = counterexamples(images.x, images.y, W, self.copies, gen)
        no_mask = torch.zeros(len(y_new), *W.shape[1:])
        return AnnotatedImages(
            torch.cat([images.x, x_new]),
            torch.cat([images.y, y_new]),
            torch.cat([images.W, no_mask]),
            torch.cat([images.M, no_mask]),
        )

    def term(self, model: nn.Module, batch: AnnotatedImages) -> torch.Tensor:
        return batch.x.new_zeros(())

    def state(self) -> dict:
        return {"copies": self.copies}
