"""Evaluate a model on the prepared splits: the numbers reviewers compare across runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xbl.data import PreparedData, to_tensor
from xbl.losses import input_gradients
from xbl.metrics import (
    activation_recall,
    classification_metrics,
    confusion_matrix,
    wrong_reason_share,
)
from xbl.runtime import model_device
from xbl.saliency import eval_mode, gradcam
from xbl.training_loop import mean_loss, predict_proba


def evaluate_split(model: nn.Module, data: PreparedData, split: str) -> tuple[dict, np.ndarray]:
    """Metrics named `<split>_<metric>`, and the split's confusion matrix."""
    x, y = data.tensors(split)
    if len(y) == 0:
        return {}, np.zeros((len(data.classes),) * 2, dtype=np.int64)
    pred = predict_proba(model, x).argmax(1)
    k = len(data.classes)
    metrics = {
        f"{split}_{name}": v for name, v in classification_metrics(y.numpy(), pred, k).items()
    }
    metrics[f"{split}_loss"] = mean_loss(model, x, y)
    return metrics, confusion_matrix(y.numpy(), pred, k)


def evaluate(model: nn.Module, data: PreparedData) -> tuple[dict, np.ndarray]:
    """Validation (confounded, what a user sees) and test (decoy-randomized: the shortcut),
    with the explanation metrics on both."""
    metrics, _ = evaluate_split(model, data, "val")
    test_metrics, test_cm = evaluate_split(model, data, "test")
    metrics.update(test_metrics)
    for split in ("val", "test"):
        metrics.update(explanation_metrics(model, data, split))
    metrics["val_explanation_score"] = explanation_score(metrics, "val")
    return metrics, test_cm


def _attribution_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image maps of the deployed model: GradCAM of the predicted class (the one the
    losses train through), and |∂ Σ_k log p_k / ∂x| scaled to [0,1]."""
    x = x.to(model_device(model))
    with eval_mode(model):
        grads = input_gradients(model, x, create_graph=False).detach().abs()
        cam = gradcam(model, x)
    grads = grads / grads.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return {"gradcam": cam.cpu().numpy(), "inputgrad": grads.cpu().numpy()}


def explanation_metrics(
    model: nn.Module, data: PreparedData, split: str, batch_size: int = 256
) -> dict[str, float]:
    """Mean AR (relevance masks) and wrong-reason share (confounder masks) per explainer.

    Images without a mask of that kind are left out of its mean (docs/methods.md, "Metrics").
    """
    idx = data.indices(split)
    per_map: dict[str, dict[str, list]] = {}
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        maps = _attribution_maps(model, to_tensor(data.images[part]))
        for name, A in maps.items():
            scores = per_map.setdefault(name, {"ar": [], "wrs": []})
            scores["ar"].append(activation_recall(A, data.relevance[part]))
            has_confounder = data.confounder[part].any(axis=(1, 2))
            if has_confounder.any():  # user data may have no confounder mask at all
                scores["wrs"].append(
                    wrong_reason_share(A[has_confounder], data.confounder[part][has_confounder])
                )
    out = {}
    for name, scores in per_map.items():
        ar = np.concatenate(scores["ar"])
        wrs = np.concatenate(scores["wrs"]) if scores["wrs"] else np.zeros(0)
        if np.isfinite(ar).any():
            out[f"{split}_activation_recall_{name}"] = float(np.nanmean(ar))
        if len(wrs):
            out[f"{split}_wrong_reason_share_{name}"] = float(wrs.mean())
    return out


def explanation_score(metrics: dict, split: str = "val") -> float | None:
    """One number, higher = righter reasons: 1 − wrong-reason share where a confounder is
    known, else the activation recall of the relevance masks (input gradients)."""
    wrs = metrics.get(f"{split}_wrong_reason_share_inputgrad")
    if wrs is not None:
        return 1.0 - wrs
    return metrics.get(f"{split}_activation_recall_inputgrad")
