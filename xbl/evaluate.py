"""Evaluate a model on the prepared splits: the numbers reviewers compare across runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xbl.data import PreparedData
from xbl.metrics import classification_metrics, confusion_matrix
from xbl.train import mean_loss, predict_proba, to_tensor


def split_tensors(data: PreparedData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = data.indices(split)
    return to_tensor(data.images[idx]), torch.from_numpy(data.labels[idx])


def evaluate_split(model: nn.Module, data: PreparedData, split: str) -> tuple[dict, np.ndarray]:
    """Metrics named `<split>_<metric>`, and the split's confusion matrix."""
    x, y = split_tensors(data, split)
    if len(y) == 0:
        return {}, np.zeros((len(data.classes),) * 2, dtype=np.int64)
    pred = predict_proba(model, x).argmax(1)
    k = len(data.classes)
    metrics = {f"{split}_{name}": v for name, v in classification_metrics(y.numpy(), pred, k).items()}
    metrics[f"{split}_loss"] = mean_loss(model, x, y)
    return metrics, confusion_matrix(y.numpy(), pred, k)


def evaluate(model: nn.Module, data: PreparedData) -> tuple[dict, np.ndarray]:
    """Validation (confounded, what a user sees) and test (decoy-randomized: the shortcut)."""
    metrics, _ = evaluate_split(model, data, "val")
    test_metrics, test_cm = evaluate_split(model, data, "test")
    metrics.update(test_metrics)
    return metrics, test_cm
