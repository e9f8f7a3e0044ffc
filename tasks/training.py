"""Model steps: train (baseline or with feedback) to a checkpoint, evaluate a checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.masks import read_feedback
from xbl.feedback.methods import METHODS
from xbl.feedback.schedule import build_feedback, retraining_schedule
from xbl.judge.evaluate import evaluate
from xbl.train.checkpoint import load_model
from xbl.train.fit import fit
from xbl.train.loop import TrainResult
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
    warm from the model that chose this round's queries (`feedback.init`). eXBL's exemplars
    are that model's explanations either way: those are what annotators judged."""
    data = PreparedData.load(Path(dataset))
    indices, W, keep, ratings = read_feedback(manifests)
    if len(indices) == 0:
        raise ValueError("no annotated images to learn from: every round's feedback is empty")
    warm = feedback.init == "warm"
    judged = None
    if warm or METHODS[feedback.method].needs_model:
        judged = load_model(query_checkpoint, resolve_device(train.device))[0]
    fb = build_feedback(
        feedback, data, indices, W, train.seed, model=judged, ratings=ratings, keep=keep
    )
    init = {k: v.cpu() for k, v in judged.state_dict().items()} if warm else None
    return fit(
        data,
        retraining_schedule(train, feedback),
        Path(out),
        init=init,
        feedback=fb,
        on_epoch=_log_epoch,
    )
