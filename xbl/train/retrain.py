"""Retraining with feedback as a round runs it: the annotated images with the method that learns
from them, the feedback's fixed schedule, and the weights the retraining starts from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.schedule import Feedback, build_feedback, retraining_schedule


@dataclass
class Retraining:
    """What a retraining with feedback runs; `fit` (or the loop) takes it from here."""

    train: TrainConfig  # the feedback's epochs and learning rate, without early stopping
    feedback: Feedback
    init: dict | None  # warm: the judged model's weights; scratch: None, the seed's


def retraining(
    data: PreparedData,
    train: TrainConfig,
    feedback: FeedbackConfig,
    indices: np.ndarray,
    W: np.ndarray,
    keep: np.ndarray | None = None,
    ratings: dict[int, str] | None = None,
    judged: nn.Module | None = None,
) -> Retraining:
    """Retraining on the annotated images `indices`, rows of `data` (ignore masks W, kept
    evidence `keep`; `read_feedback` finds each mask's row by image ID), from a fresh start or
    warm from `judged`, the model whose explanations annotators judged (`feedback.init`).
    eXBL's exemplars are that model's either way: those are what annotators judged; `judged`
    may be None when neither needs it."""
    fb = build_feedback(
        feedback, data, indices, W, train.seed, model=judged, ratings=ratings, keep=keep
    )
    init = None
    if feedback.init == "warm":
        init = {k: v.cpu() for k, v in judged.state_dict().items()}
    return Retraining(retraining_schedule(train, feedback), fb, init)
