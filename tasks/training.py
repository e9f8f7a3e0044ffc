"""Model steps: train (baseline or with feedback) to a checkpoint, evaluate a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import get_run_logger, task

from xbl.config import resolve_device
from xbl.data import PreparedData
from xbl.evaluate import evaluate, split_tensors
from xbl.models import build_model
from xbl.train import (Feedback, FeedbackDiverged, TrainConfig, checkpoint_meta, initial_model,
                       load_checkpoint, save_checkpoint, save_last_good, train)


@dataclass
class TrainOutcome:
    checkpoint: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    min_val_loss: float = float("nan")
    device: str = "cpu"
    effective_lambda: float | None = None


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    state, meta = load_checkpoint(Path(checkpoint))
    model = build_model(meta["model"], meta["in_channels"], meta["n_classes"], meta["image_size"])
    model.load_state_dict(state)
    return model.to(device)


def _epoch_logger(logger):
    return lambda row: logger.info("epoch %(epoch)d  val_loss %(val_loss).4f  "
                                   "val_accuracy %(val_accuracy).3f", row)


def fit(data: PreparedData, train_params: dict, out: Path, init: str | None = None,
        feedback: Feedback | None = None, model_name: str | None = None) -> TrainOutcome:
    """Train on the train split, early-stopped on val; the checkpoint holds the best weights.
    With `train.devices` > 1 the same training runs data-parallel in that many processes."""
    device = resolve_device(train_params.get("device", "auto"))
    name = model_name or train_params.get("model", "small_cnn")
    log_epoch = _epoch_logger(get_run_logger())
    devices = int(train_params.get("devices", 1))
    if devices > 1:  # one process per device under torchrun (gloo on CPU, nccl on GPUs)
        from xbl.distributed import train_distributed

        r = train_distributed(devices, data, train_params, out, init=init, feedback=feedback,
                              model_name=name, on_epoch=log_epoch)
        return TrainOutcome(r["checkpoint"], r["history"], r["best_epoch"], r["min_val_loss"],
                            r["device"], r["effective_lambda"])
    return _fit_here(data, train_params, out, init, feedback, name, device, log_epoch)


def _fit_here(data: PreparedData, train_params: dict, out: Path, init: str | None,
              feedback: Feedback | None, name: str, device: torch.device, log_epoch) -> TrainOutcome:
    """Training in this process."""
    model = initial_model(name, data, int(train_params.get("seed", 0)), init).to(device)
    tx, ty = split_tensors(data, "train")
    vx, vy = split_tensors(data, "val")
    meta = checkpoint_meta(name, data)
    try:
        result = train(model, tx, ty, vx, vy, TrainConfig.from_params(train_params), feedback,
                       on_epoch=log_epoch)
    except FeedbackDiverged as diverged:
        kept = save_last_good(model, out, meta)  # for whoever investigates
        raise FeedbackDiverged(f"{diverged} Last good weights: {kept}", diverged.method,
                               diverged.lam, diverged.epoch, diverged.best_epoch) from None
    save_checkpoint(model, out, meta)
    return TrainOutcome(str(out), result.history, result.best_epoch, result.min_val_loss,
                        str(device), result.effective_lambda)


@task
def train_baseline(dataset: str, train_params: dict, out: str) -> TrainOutcome:
    """Plain cross-entropy training: the model whose shortcut we will measure."""
    return fit(PreparedData.load(Path(dataset)), train_params, Path(out))


@task
def evaluate_checkpoint(checkpoint: str, dataset: str) -> dict:
    """Confounded-validation and decoy-randomized-test metrics, plus the test confusion matrix."""
    data = PreparedData.load(Path(dataset))
    metrics, cm = evaluate(load_model(checkpoint), data)
    return {"metrics": metrics, "confusion_matrix": cm.tolist(), "classes": data.classes.tolist()}


@task
def train_with_feedback(dataset: str, baseline_checkpoint: str, manifests: list[str],
                        train_params: dict, feedback_params: dict, out: str) -> TrainOutcome:
    """Retrain with CE + λ·L_expl on every round's annotated images, from a fresh start or the
    baseline's weights (`feedback.init`). eXBL's exemplars are the baseline's explanations
    either way: those are what annotators judged."""
    from tasks.annotation import read_feedback
    from xbl.feedback import build_feedback, from_scratch, retraining_schedule

    scratch = from_scratch(feedback_params)  # a bad setting fails before any work
    data = PreparedData.load(Path(dataset))
    indices, W, ratings = read_feedback(manifests)
    if len(indices) == 0:
        raise ValueError("no annotated images to learn from: every round's feedback is empty")
    method = feedback_params.get("method", "rrr")
    baseline = load_model(baseline_checkpoint, resolve_device(train_params.get("device", "auto")))
    feedback = build_feedback(method, data, indices, W,
                              {**feedback_params, "seed": train_params.get("seed", 0)},
                              model=baseline, ratings=ratings)
    schedule = retraining_schedule(train_params, feedback_params)
    return fit(data, schedule, Path(out), feedback=feedback,
               init=None if scratch else baseline_checkpoint)
