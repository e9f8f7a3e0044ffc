"""MLflow steps against a real SQLite tracking store: a retried step leaves no duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services import tracking
from tasks.runs import log_model_run
from xbl.train.checkpoint import save_checkpoint
from xbl.train.loop import TrainResult
from xbl.train.models import SmallCNN

META = {"model": "small_cnn", "in_channels": 1, "n_classes": 10, "image_size": 28}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client_for(tmp_path)
    exp = tracking.experiment_id(client, tmp_path, "retry")
    return tmp_path, client, exp, tracking.start_run(client, exp, "flow")


def test_a_retried_model_run_leaves_one_run_and_one_registered_version(store):
    project, client, exp, parent = store
    torch.manual_seed(0)
    model = SmallCNN()
    checkpoint = save_checkpoint(model, project / "model.pt", META)
    outcome = TrainResult(
        str(checkpoint), [{"epoch": 1, "val_loss": 1.0}], best_epoch=1, min_val_loss=1.0
    )
    evaluation = {
        "metrics": {"val_accuracy": 0.5},
        "confusion_matrix": np.eye(10).tolist(),
        "classes": [str(c) for c in range(10)],
    }
    # the first attempt died after registering its model, before finishing its run
    first = tracking.start_run(client, exp, "baseline", parent, {})
    tracking.log_model(first, model, 1, 28, [str(c) for c in range(10)], "retry-model")

    result = log_model_run.fn(
        str(project), parent, "baseline", {"lr": 0.1}, outcome, evaluation, "v1", "retry-model"
    )

    assert client.get_run(first).info.status == "FAILED"
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    versions = client.search_model_versions("name = 'retry-model'")
    assert [v.run_id for v in versions] == [result["run_id"]]
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'"
    )
    assert [r.info.run_id for r in children] == [result["run_id"]]


def test_a_stored_baseline_is_reused_only_for_the_same_data_and_train_settings(store):
    """The loop trains a baseline once per data version and train settings: a changed model,
    learning rate or dataset must not silently reuse the old one (device does not count)."""
    from dataclasses import replace

    from flows.baseline import baseline_fingerprint
    from xbl.config import TrainConfig

    project, client, exp, parent = store
    train = TrainConfig()
    run = tracking.start_run(
        client,
        exp,
        "baseline",
        parent,
        {tracking.DATA_VERSION_TAG: "v1", tracking.TRAIN_SETTINGS_TAG: baseline_fingerprint(train)},
    )
    version = tracking.log_model(run, SmallCNN(), 1, 28, [str(c) for c in range(10)], "m")
    client.set_terminated(run)
    tracking.set_alias(client, "m", "baseline", version)

    def found(data_version: str, settings: TrainConfig):
        tags = {tracking.TRAIN_SETTINGS_TAG: baseline_fingerprint(settings)}
        return tracking.model_record(client, "m", "baseline", data_version, tags)

    assert found("v1", train)["run_id"] == run
    assert found("v1", replace(train, device="cpu", devices=2))["run_id"] == run
    assert found("v2", train) is None
    assert found("v1", replace(train, lr=0.01)) is None
    assert found("v1", replace(train, model="resnet18")) is None
    client.set_terminated(run, status="FAILED")
    assert found("v1", train) is None  # a failed run is no baseline


def test_each_project_keeps_its_own_store_within_one_process(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; if that leaked, the first project
    # a worker touched would receive every later project's runs and champions
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    tracking.client_for(first)
    client = tracking.client_for(second)
    assert tracking.tracking_uri(second) == f"sqlite:///{second.resolve()}/mlflow.db"
    tracking.experiment_id(client, second, "own")
    assert (second / "mlflow.db").exists()
    assert not (first / "mlflow.db").exists() or not tracking.client_for(
        first
    ).get_experiment_by_name("own")


def test_a_store_the_user_exported_is_kept(tmp_path, monkeypatch):
    shared = f"sqlite:///{tmp_path.resolve()}/shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    tracking.client_for(tmp_path / "a")
    assert tracking.tracking_uri(tmp_path / "b") == shared
