"""The foundation end to end: DVC-versioned data → baseline → MLflow, as a Prefect flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from flows.baseline import baseline_flow
from services import dvc, tracking
from services.checkout import checkout_run_data
from xbl.data.prepared import PreparedData

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


# a Python with mlflow, numpy and torch, and none of this repository's code
LOAD_ANYWHERE = r"""
import json, sys

class NotHere:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"xbl", "flows", "tasks", "services", "bench"}:
            raise ImportError(f"{name}: not installed where the model is used")

sys.meta_path.insert(0, NotHere())
import mlflow
import numpy as np
from PIL import Image

model = mlflow.pyfunc.load_model(sys.argv[1])
card = model.metadata.metadata
png = Image.open(sys.argv[2]).convert("L").resize((card["image_size"],) * 2)
print(model.predict(np.asarray(png, np.uint8)[None, None]).to_json(orient="records"))
"""


def test_the_registered_model_loads_without_this_repository_and_names_its_classes(
    baseline_run, tmp_path
):
    from PIL import Image

    project, result = baseline_run
    data = PreparedData.load(project / "data" / "prepared")
    i = int(data.indices("test")[0])
    Image.fromarray(np.asarray(data.images[i][0])).save(tmp_path / "digit.png")
    uri = tracking.tracking_uri(project)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    out = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_ANYWHERE, "models:/xbl-classifier@baseline"]
        + [str(tmp_path / "digit.png")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (answer,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["class"] in data.classes
    probs = [answer[f"p_{c}"] for c in data.classes]
    assert sum(probs) == pytest.approx(1, abs=1e-4) and answer["probability"] == max(probs)


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
