"""Evaluate a model on the prepared splits: the numbers reviewers compare across runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xbl.data.images import to_tensor
from xbl.data.prepared import AUDIT, PreparedData
from xbl.explain.metrics import activation_recall, dead_maps, outside_share, wrong_reason_share
from xbl.explain.saliency import deeplift_blurred, eval_mode, gradcam
from xbl.feedback.losses import input_gradient_map
from xbl.judge.metrics import classification_metrics, confusion_matrix
from xbl.train.loop import nll, predict_proba
from xbl.train.runtime import model_device


def evaluate_split(model: nn.Module, data: PreparedData, split: str) -> tuple[dict, np.ndarray]:
    """Metrics named `<split>_<metric>`, and the split's confusion matrix."""
    images = data.split_images(split)
    if len(images) == 0:
        return {}, np.zeros((len(data.classes),) * 2, dtype=np.int64)
    probs = predict_proba(model, images)
    pred, y = probs.argmax(1), images.labels.numpy()
    k = len(data.classes)
    metrics = {f"{split}_{name}": v for name, v in classification_metrics(y, pred, k).items()}
    metrics[f"{split}_loss"] = nll(probs, images.labels)
    return metrics, confusion_matrix(y, pred, k)


EXPLAINERS = ("deeplift", "gradcam", "inputgrad")
SCORED_BY = "deeplift"  # no feedback term optimises it, so the loss cannot game the score


def evaluate(model: nn.Module, data: PreparedData) -> tuple[dict, np.ndarray]:
    """Validation (confounded, what a user sees), test (decoy-randomized for the built-ins)
    and, where the dataset has one, the audit split (shortcut-free evidence for promotion),
    with the explanation metrics on each."""
    metrics, _ = evaluate_split(model, data, "val")
    test_metrics, test_cm = evaluate_split(model, data, "test")
    metrics.update(test_metrics)
    metrics.update(evaluate_split(model, data, AUDIT)[0])
    for split in ("val", "test", AUDIT):
        metrics.update(explanation_metrics(model, data, split))
    score, _ = explanation_score(metrics, "val")
    if score is not None:
        metrics["val_explanation_score"] = score
    return metrics, test_cm


def _attribution_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image maps of the deployed model for its predicted class: DeepLIFT against a
    blurred baseline (what annotators see by default), GradCAM (what HINT and eXBL train
    through) and the per-pixel norm over channels of ∂ Σ_k log p_k / ∂x (what rrr trains),
    each scaled to [0,1]."""
    x = x.to(model_device(model))
    with eval_mode(model):
        grads = input_gradient_map(model, x, create_graph=False).detach()
        cam = gradcam(model, x)
    grads = grads / grads.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    lift = deeplift_blurred(model, x).abs()
    return {
        "deeplift": lift.cpu().numpy(),
        "gradcam": cam.cpu().numpy(),
        "inputgrad": grads.cpu().numpy(),
    }


def explanation_metrics(
    model: nn.Module, data: PreparedData, split: str, batch_size: int = 256
) -> dict[str, float]:
    """Per explainer: activation recall and the share of attribution outside the relevance
    masks, and the wrong-reason share on confounder masks; each mean is over the images that
    have a mask of that kind (docs/methods.md, "Metrics"). A dead map (all zero or non-finite)
    is left out of every score and counted in `dead_map_share_<explainer>`."""
    idx = data.indices(split)
    scores: dict[str, list] = {}
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        relevance, confounder = data.relevance[part], data.confounder[part]
        has_confounder = confounder.any(axis=(1, 2))
        for name, A in _attribution_maps(model, to_tensor(data.images[part])).items():
            scores.setdefault(f"activation_recall_{name}", []).append(
                activation_recall(A, relevance)
            )
            scores.setdefault(f"outside_share_{name}", []).append(outside_share(A, relevance))
            scores.setdefault(f"wrong_reason_share_{name}", []).append(
                wrong_reason_share(A[has_confounder], confounder[has_confounder])
            )
            scores.setdefault(f"dead_map_share_{name}", []).append(dead_maps(A).astype(float))
    out = {}
    for name, parts in scores.items():
        values = np.concatenate(parts)
        if np.isfinite(values).any():
            out[f"{split}_{name}"] = float(np.nanmean(values))
    return out


def explanation_score(metrics: dict, split: str = "val") -> tuple[float | None, str]:
    """One number, higher = righter reasons, by an explainer no feedback term optimises, and
    what it rests on: 1 − wrong-reason share where confounder masks exist, else 1 − the share
    of attribution outside the relevance masks, else nothing (None)."""
    dead = metrics.get(f"{split}_dead_map_share_{SCORED_BY}", 0.0)
    flag = f"; {dead:.0%} of the maps dead, left out" if dead > 0 else ""
    wrs = metrics.get(f"{split}_wrong_reason_share_{SCORED_BY}")
    if wrs is not None:
        return 1.0 - wrs, f"1 − wrong-reason share ({SCORED_BY}, confounder masks{flag})"
    outside = metrics.get(f"{split}_outside_share_{SCORED_BY}")
    if outside is not None:
        return 1.0 - outside, f"1 − attribution outside the relevance masks ({SCORED_BY}{flag})"
    if dead >= 1.0:
        return None, f"every {SCORED_BY} map is dead (all zero or non-finite): no explanation score"
    return None, "no masks: no explanation score"
