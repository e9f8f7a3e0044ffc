"""The foundation end to end: DVC-versioned data → baseline → MLflow, as a Prefect flow."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from flows.baseline import baseline_flow
from services import dvc, tracking
from services.checkout import checkout_run_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    from tests.integration.project import TINY_TRAIN, make_project

    project = make_project(tmp_path_factory.mktemp("baseline") / "project", train=TINY_TRAIN)
    result = baseline_flow(str(project))
    return project, result


def test_baseline_run_is_tracked_with_its_data_version(baseline_run):
    project, result = baseline_run
    client = MlflowClient(tracking.tracking_uri(project))
    run = client.get_run(result["baseline"]["run_id"])
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    locked = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert run.data.tags[tracking.DATA_VERSION_TAG] == locked == result["data_version"]
    assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    for key in (
        "val_accuracy",
        "test_accuracy",
        "val_macro_precision",
        "val_macro_recall",
        "min_val_loss",
        "val_class_3_accuracy",
    ):
        assert 0.0 <= run.data.metrics[key] <= 5.0, key
    assert run.data.metrics["val_accuracy"] > 0.5  # it learnt something
    curve = client.get_metric_history(run.info.run_id, "curve/val_loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1))
    best = min(m.value for m in curve)
    assert run.data.metrics["min_val_loss"] == pytest.approx(best)
    # each epoch's training seconds, the price a reviewer weighs a feedback run by
    seconds = client.get_metric_history(run.info.run_id, "curve/train_seconds")
    assert [m.step for m in seconds] == [m.step for m in curve]
    assert all(m.value > 0 for m in seconds)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dvc.lock", "confusion_matrix.png"} <= artifacts
    assert run.data.params["lr"] == "0.001"


def test_baseline_model_is_registered_with_alias(baseline_run):
    project, result = baseline_run
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    version = client.get_model_version_by_alias("xbl-classifier", "baseline")
    assert version.run_id == result["baseline"]["run_id"]
    import mlflow.pytorch
    import torch

    mlflow.set_registry_uri(tracking.tracking_uri(project))
    model = mlflow.pytorch.load_model("models:/xbl-classifier@baseline")
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_data_was_pushed_to_the_remote(baseline_run):
    project, result = baseline_run
    remote = project / dvc.REMOTE_DIR
    stored = [p for p in remote.rglob("*") if p.is_file()]
    assert any(result["data_version"].removesuffix(".dir")[2:] in p.name for p in stored)


def test_checkout_restores_a_runs_data_after_the_dataset_changed(baseline_run):
    project, result = baseline_run
    dataset = project / "data" / "prepared" / "images.npy"
    original = dataset.read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["seed"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc.repro(project, "prepare")
    assert dataset.read_bytes() != original
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import shutil, sys; shutil.rmtree(sys.argv[1])",
            str(project / ".dvc" / "cache"),
        ],
        check=True,
    )  # force the remote path
    version = checkout_run_data(project, result["baseline"]["run_id"])
    assert version == result["data_version"]
    assert dataset.read_bytes() == original


def test_table_artifact_holds_the_final_metrics(baseline_run):
    _, result = baseline_run
    row = result["table"][0]
    assert row["model"] == "baseline"
    assert row["test_accuracy"] == round(result["baseline"]["metrics"]["test_accuracy"], 4)
