"""Model steps: train (baseline or with feedback) to a checkpoint, evaluate a checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.masks import read_feedback
from xbl.feedback.methods import METHODS
from xbl.judge.evaluate import evaluate
from xbl.train.checkpoint import load_model
from xbl.train.fit import fit
from xbl.train.loop import TrainResult
from xbl.train.retrain import retraining
from xbl.train.runtime import resolve_device


def _log_epoch(row: dict) -> None:
    get_run_logger().info(
        "epoch %(epoch)d  val_loss %(val_loss).4f  val_accuracy %(val_accuracy).3f", row
    )


@task
def train_baseline(dataset: str, cfg: TrainConfig, out: str) -> TrainResult:
    """Plain cross-entropy training: the model whose shortcut we will measure."""
    return fit(PreparedData.load(Path(dataset)), cfg, Path(out), on_epoch=_log_epoch)


@task
def evaluate_checkpoint(checkpoint: str, dataset: str) -> dict:
    """Confounded-validation and decoy-randomized-test metrics, plus the test confusion matrix."""
    data = PreparedData.load(Path(dataset))
    metrics, cm = evaluate(load_model(checkpoint)[0], data)
    return {"metrics": metrics, "confusion_matrix": cm.tolist(), "classes": data.classes.tolist()}


@task
def train_with_feedback(
    dataset: str,
    query_checkpoint: str,
    manifests: list[str],
    train: TrainConfig,
    feedback: FeedbackConfig,
    out: str,
) -> TrainResult:
    """Retrain with CE + λ·L_expl on every round's annotated images, from a fresh start or
    warm from the model that chose this round's queries (`feedback.init`, `retraining`)."""
    data = PreparedData.load(Path(dataset))
    indices, W, keep, ratings = read_feedback(manifests)
    if len(indices) == 0:
        raise ValueError("no annotated images to learn from: every round's feedback is empty")
    judged = None
    if feedback.init == "warm" or METHODS[feedback.method].needs_model:
        judged = load_model(query_checkpoint, resolve_device(train.device))[0]
    plan = retraining(data, train, feedback, indices, W, keep, ratings, judged)
    return fit(
        data, plan.train, Path(out), init=plan.init, feedback=plan.feedback, on_epoch=_log_epoch
    )
