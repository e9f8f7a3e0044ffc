"""Model steps: train (baseline or with feedback) to a checkpoint, evaluate a checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from prefect import get_run_logger, task

from services import tracking
from xbl.config import FeedbackConfig, TrainConfig
from xbl.data.prepared import PreparedData
from xbl.errors import DataError
from xbl.feedback.masks import JoinedFeedback, read_feedback
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


def _epoch_reporter(run: tracking.ModelRun | None) -> Callable[[dict], None]:
    """Each epoch to the flow run's log and, given the model's run, to MLflow as it ends."""
    live = (
        tracking.epoch_logger(tracking.client_for(Path(run.project)), run.run_id) if run else None
    )

    def report(row: dict) -> None:
        nonlocal live
        _log_epoch(row)
        if live is None:
            return
        try:
            live(row)
        except Exception as err:  # noqa: BLE001 - a tracking outage must not end the training
            get_run_logger().warning(
                "MLflow did not take epoch %d (%s): the curves follow when training ends",
                row["epoch"],
                err,
            )
            live = None  # log_model_run logs the epochs the run lacks

    return report


@contextmanager
def _failing_run_on_error(run: tracking.ModelRun | None) -> Iterator[None]:
    """A training that raises leaves its run FAILED, not RUNNING in the UI forever."""
    try:
        yield
    except BaseException:
        # the training's error is the one to see; a run left RUNNING by an outage here is
        # failed by the next attempt (start_model_run)
        with suppress(Exception):
            if run is not None:
                tracking.client_for(Path(run.project)).set_terminated(run.run_id, "FAILED")
        raise


@task
def train_baseline(
    dataset: str, cfg: TrainConfig, out: str, run: tracking.ModelRun | None = None
) -> TrainResult:
    """Plain cross-entropy training: the model whose shortcut we will measure. Given `run`
    (start_model_run), each epoch's curves reach it as the epoch ends."""
    with _failing_run_on_error(run):
        data = PreparedData.load(Path(dataset))
        return fit(data, cfg, Path(out), on_epoch=_epoch_reporter(run))


@task
def evaluate_checkpoint(checkpoint: str, dataset: str) -> dict:
    """Confounded-validation and decoy-randomized-test metrics, plus the test confusion matrix."""
    data = PreparedData.load(Path(dataset))
    metrics, cm = evaluate(load_model(checkpoint)[0], data)
    return {"metrics": metrics, "confusion_matrix": cm.tolist(), "classes": data.classes.tolist()}


def _joined_feedback(
    data: PreparedData,
    manifests: list[str],
    data_version: str | None,
    made_on: dict[int, str] | None,
) -> JoinedFeedback:
    """Every round's masks on their images in this data version, with what is left out logged."""
    joined = read_feedback(manifests, data, data_version, made_on)
    log = get_run_logger()
    for note in joined.notes():
        log.warning("%s", note)
    log.info("feedback masks: %d on their images, %d left out", len(joined.rows), joined.left_out())
    return joined


@task
def feedback_join_summary(
    dataset: str,
    manifests: list[str],
    data_version: str | None = None,
    made_on: dict[int, str] | None = None,
) -> dict:
    """Which earlier masks this data version still holds the images of: counts and image IDs of
    the joined, the gone, the ones no longer in training and the ones that cannot be joined."""
    data = PreparedData.load(Path(dataset))
    return _joined_feedback(data, manifests, data_version, made_on).summary()


@task
def train_with_feedback(
    dataset: str,
    query_checkpoint: str,
    manifests: list[str],
    train: TrainConfig,
    feedback: FeedbackConfig,
    out: str,
    data_version: str | None = None,
    made_on: dict[int, str] | None = None,
    run: tracking.ModelRun | None = None,
) -> TrainResult:
    """Retrain with CE + λ·L_expl on every round's annotated images, each mask found on its
    image by ID in this data version (`read_feedback`), from a fresh start or warm from the
    model that chose this round's queries (`feedback.init`, `retraining`). `made_on` (round ->
    data version) lets a row written without an image ID join by its index on the data version
    it was made on. Given `run` (start_model_run), each epoch's curves reach it as it ends."""
    with _failing_run_on_error(run):
        data = PreparedData.load(Path(dataset))
        joined = _joined_feedback(data, manifests, data_version, made_on)
        if len(joined.rows) == 0:
            raise DataError(
                "no annotated images to learn from: every round's feedback is empty or left out "
                f"({joined.summary()})"
            )
        judged = None
        if feedback.init == "warm" or METHODS[feedback.method].needs_model:
            judged = load_model(query_checkpoint, resolve_device(train.device))[0]
        plan = retraining(
            data, train, feedback, joined.rows, joined.ignore, joined.keep, joined.ratings, judged
        )
        return fit(
            data,
            plan.train,
            Path(out),
            init=plan.init,
            feedback=plan.feedback,
            on_epoch=_epoch_reporter(run),
        )
