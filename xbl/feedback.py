"""Turn annotated images into the `Feedback` a retraining round uses, per method."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xbl.data import PreparedData
from xbl.losses import FEEDBACK_METHODS, counterexamples, explanation, select_exemplars
from xbl.train import Feedback, to_tensor


def relevance_for(data: PreparedData, indices: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Where the evidence is: the image's relevance mask minus what annotators said to ignore."""
    return data.relevance[indices] & ~W


def build_feedback(method: str, data: PreparedData, indices: np.ndarray, W: np.ndarray,
                   settings: dict, model: nn.Module | None = None,
                   ratings: dict[int, str] | None = None) -> Feedback:
    """Feedback on the annotated training images `indices` with their ignore masks W (n,H,W).

    Counterexamples add noisy copies of each image (labels kept); eXBL fixes its good and bad
    exemplars up front, from annotators' ratings when given, else by Activation Recall.
    """
    if method not in FEEDBACK_METHODS:
        raise ValueError(f"unknown feedback method {method!r}; choose one of {list(FEEDBACK_METHODS)}")
    indices = np.asarray(indices)
    x = to_tensor(data.images[indices])
    y = torch.from_numpy(data.labels[indices])
    Wt = torch.from_numpy(np.asarray(W, dtype=bool))
    M = torch.from_numpy(relevance_for(data, indices, np.asarray(W, dtype=bool)))
    exemplars = None
    if method == "counterexamples":
        gen = torch.Generator().manual_seed(int(settings.get("seed", 0)))
        x_new, y_new = counterexamples(x, y, Wt, int(settings.get("counterexample_copies", 3)), gen)
        x, y = torch.cat([x, x_new]), torch.cat([y, y_new])
        Wt = torch.cat([Wt, torch.zeros(len(y_new), *Wt.shape[1:], dtype=torch.bool)])
        M = torch.cat([M, torch.zeros_like(Wt[len(M):])])
    elif method == "exbl":
        if model is None:
            raise ValueError("eXBL needs the baseline model to compute its exemplars")
        exemplars = exbl_exemplars(model, x, y, M, ratings)
    return Feedback(method=method, x=x, y=y, W=Wt.float(), M=M.float(),
                    lam=method_lambda(settings, method),
                    normalize_lambda=bool(settings.get("normalize_lambda", False)),
                    per_batch=int(settings.get("per_batch", 16)),
                    margin=float(settings.get("exbl_margin", 1.0)), exemplars=exemplars)


def retraining_schedule(train_params: dict, feedback_params: dict) -> dict:
    """Train settings for a feedback retraining: the feedback's epochs and learning rate on a
    fixed schedule (early stopping on the confounded val split would pick the shortcut back)."""
    return {**train_params, "epochs": feedback_params.get("epochs", 20),
            "lr": feedback_params.get("lr", train_params.get("lr")), "patience": 0}


def from_scratch(feedback_params: dict) -> bool:
    """`init: scratch` retrains from a fresh start, as RRR does (fine-tuning only moves the model
    near the annotated images); `init: baseline` fine-tunes the baseline's weights."""
    init = feedback_params.get("init", "scratch")
    if init not in ("scratch", "baseline"):
        raise ValueError(f"feedback.init is {init!r}: expected 'scratch' or 'baseline'")
    return init == "scratch"


def method_lambda(settings: dict, method: str) -> float:
    """λ for `method`: params give one per method (the terms differ by orders of magnitude),
    or a single number for all."""
    lam = settings.get("lambda", 1.0)
    if isinstance(lam, dict):
        if method not in lam:
            raise ValueError(f"feedback.lambda has no value for method {method!r}: "
                             f"add `{method}: <weight>` under feedback.lambda in params.yaml")
        lam = lam[method]
    return float(lam)


def exbl_exemplars(model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor,
                   ratings: dict[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e_good, e_bad: rated explanations when annotators rated both kinds, else max/min AR."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    ratings = ratings or {}
    good = [i for i, r in ratings.items() if r == "good"]
    bad = [i for i, r in ratings.items() if r == "bad"]
    if good and bad:
        g, b = good[0], bad[0]
    else:
        g, b = select_exemplars(model, x, y, M.to(device))
    return tuple(explanation(model, x[[i]], y[[i]], create_graph=False).detach() for i in (g, b))
