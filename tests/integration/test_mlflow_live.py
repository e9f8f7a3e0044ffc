"""What a model run holds in a real SQLite MLflow store: its DVC data versions as datasets, its
curves epoch by epoch while it trains, its metrics in batches, its probe saliency by round."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from prefect import flow

from services import tracking
from tasks.runs import log_model_run, log_probe_saliency, open_parent_run, start_model_run
from tasks.training import evaluate_checkpoint, train_baseline
from xbl.config import TrainConfig
from xbl.data.digits import decoy_digits
from xbl.data.prepared import PreparedData
from xbl.train.fit import fit

pytestmark = pytest.mark.timeout(300)

CFG = TrainConfig(epochs=3, patience=0, batch_size=64, seed=0, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Every eighth decoy digit: enough to train three quick epochs and draw the probes."""
    full = decoy_digits()
    data = full.take(np.arange(0, len(full), 8))
    path = tmp_path_factory.mktemp("live-data") / "prepared"
    data.save(path)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = str(tmp_path)
    parent = open_parent_run.fn(project, "live", "round-1", "d41d8cd98f00b204e9800998ecf8427e.dir")
    return project, tracking.client_for(tmp_path), parent


class CountingClient(MlflowClient):
    """The real client, counting the requests that log metrics, params and tags."""

    batches = 0

    def log_batch(self, *args, **kwargs):
        self.batches += 1
        return super().log_batch(*args, **kwargs)


def _inputs(client, run_id: str) -> dict[str, tuple[str, str, str]]:
    found = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        found[item.dataset.name] = (item.dataset.digest, item.dataset.source_type, context)
    return found


def test_a_model_run_records_its_dvc_versions_as_datasets(store):
    project, client, parent = store
    data, masks = "d41d8cd98f00b204e9800998ecf8427e.dir", "0cc175b9c0f1b6a831c399e269772661.dir"
    run = start_model_run.fn(
        project, parent, "feedback-round-1", data, "m", {tracking.FEEDBACK_VERSION_TAG: masks}
    )
    assert _inputs(client, run.run_id) == {
        "prepared": (data, "dvc", "training"),
        "feedback": (masks, "dvc", "feedback"),
    }
    assert client.get_run(run.run_id).data.tags[tracking.DATA_VERSION_TAG] == data
    assert _inputs(client, parent) == {"prepared": (data, "dvc", "training")}


def test_each_epoch_is_in_the_store_before_the_next_one_ends(store, dataset):
    project, _, parent = store
    run = start_model_run.fn(project, parent, "baseline", "v1", "m")
    client = CountingClient(tracking.tracking_uri(Path(project)))
    log_live = tracking.epoch_logger(client, run.run_id)
    held_before = []

    def on_epoch(row: dict) -> None:
        history = client.get_metric_history(run.run_id, "curve/val_loss")
        held_before.append(sorted(m.step for m in history))
        log_live(row)

    fit(PreparedData.load(dataset), CFG, Path(project) / "m.pt", on_epoch=on_epoch)

    assert held_before == [[], [1], [1, 2]]
    assert client.batches == CFG.epochs  # one request per epoch, all its curves in it
    assert tracking.logged_epochs(client, run.run_id) == {1, 2, 3}


def test_batches_respect_mlflows_limits_and_lose_nothing(store):
    project, _, parent = store
    client = CountingClient(tracking.tracking_uri(Path(project)))
    metrics = {f"m{i}": float(i) for i in range(1500)}
    params = {"group": {f"p{i}": i for i in range(250)}}
    tracking.log_batch(client, parent, metrics, params, {"a": 1, "b": "two"})

    assert client.batches == 3  # the 250 params need three calls; the metrics ride along
    data = client.get_run(parent).data
    assert len(data.metrics) == 1500 and data.metrics["m1499"] == 1499.0
    assert len([k for k in data.params if k.startswith("group.")]) == 250
    assert data.params["group.p7"] == "7" and data.tags["b"] == "two"
    tracking.log_series(client, parent, "round/task_seconds", [3.0, 1.5, 2.0])
    assert client.batches == 4
    series = client.get_metric_history(parent, "round/task_seconds")
    assert sorted((m.step, m.value) for m in series) == [(0, 3.0), (1, 1.5), (2, 2.0)]


def test_a_live_run_is_trained_logged_and_retried_into_one_run(store, dataset, tmp_path):
    project, client, parent = store
    run = start_model_run.fn(project, parent, "baseline", "v1", "m")
    trained = flow(name="live-training")(
        lambda: train_baseline(str(dataset), CFG, str(tmp_path / "b.pt"), run)
    )()
    assert tracking.logged_epochs(client, run.run_id) == {1, 2, 3}  # before log_model_run
    evaluation = evaluate_checkpoint.fn(trained.checkpoint, str(dataset))
    args = (project, parent, "baseline", {"lr": CFG.lr}, trained, evaluation, "v1", "m")
    log_model_run.fn(*args, run=run)
    result = log_model_run.fn(*args, run=run)  # a retry of the step

    assert result["run_id"] == run.run_id
    history = client.get_metric_history(run.run_id, "curve/val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch once
    assert [v.run_id for v in client.search_model_versions("name = 'm'")] == [run.run_id]
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.params["lr"] == str(CFG.lr)


def test_a_training_that_fails_fails_its_run(store, tmp_path):
    project, client, parent = store
    run = start_model_run.fn(project, parent, "baseline", "v1", "m")
    with pytest.raises(FileNotFoundError):
        flow(name="failed-training")(
            lambda: train_baseline(str(tmp_path / "nowhere"), CFG, str(tmp_path / "b.pt"), run)
        )()
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_probe_saliency_is_an_image_per_round(store, dataset, tmp_path):
    project, client, parent = store
    run = start_model_run.fn(project, parent, "feedback-round-2", "v1", "m")
    checkpoint = str(
        fit(PreparedData.load(dataset), replace(CFG, epochs=1), tmp_path / "c.pt").checkpoint
    )
    for round_number in (1, 2):
        key = log_probe_saliency.fn(project, run.run_id, str(dataset), checkpoint, round_number)

    logged = tracking.logged_images(client, run.run_id, key)
    assert sorted(logged) == [1, 2]
    png = tracking.download_artifact(client, run.run_id, logged[2], tmp_path / "dl")
    width, height = Image.open(png).size
    assert height > width > 100  # the probes one per row: the image, then the model's map
