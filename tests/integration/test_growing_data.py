"""Data that grows between rounds, against the real Label Studio, MLflow, DVC and Prefect: a
team answers a round on its manifest, then adds images (listed first, so every earlier row
moves) and drops one it had answered. The next round trains every earlier mask on its own
image, found by ID, and leaves out only the mask whose image is gone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.training as training
from flows.loop import feedback_round_flow
from tests.integration.project import make_project
from tests.integration.test_user_data_loop import SMALL, write_dataset
from xbl.data.prepared import PreparedData
from xbl.feedback.masks import read_feedback

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

IMAGE_SIZE = 32
FIELDS = ["image", "label", "split", "mask", "confounder_mask"]


@pytest.fixture
def team_env(labelstudio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)


def write_manifest(root, rows: list[dict]) -> None:
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def added_images(root, n: int) -> list[dict]:
    """n new images per class in root/added, as rows of the dataset's manifest."""
    rows = write_dataset(root / "added", n=n, with_masks=True, seed=1)
    return [
        {k: f"added/{v}" if k in ("image", "mask", "confounder_mask") else v for k, v in r.items()}
        for r in rows
    ]


def record_retraining(monkeypatch) -> list[dict]:
    """Each retraining's annotated images (their IDs and rows) and masks, as the real
    `retraining` receives them: what the feedback term will train on."""
    calls, real = [], training.retraining

    def recording(data, train, feedback, indices, W, *rest, **kwargs):
        rows = np.asarray(indices)
        calls.append({"ids": [str(data.ids[r]) for r in rows], "rows": rows, "W": np.array(W)})
        return real(data, train, feedback, indices, W, *rest, **kwargs)

    monkeypatch.setattr(training, "retraining", recording)
    return calls


def answers(project, n: int) -> dict[str, np.ndarray]:
    """Round n's masks by image ID, read from the files the round wrote."""
    folder = project / "data" / "feedback" / f"round-{n}"
    with (folder / "manifest.csv").open(newline="") as fh:
        return {
            row["image_id"]: np.asarray(Image.open(folder / row["mask"])) > 0
            for row in csv.DictReader(fh)
        }


def test_every_earlier_mask_lands_on_its_own_image_when_the_manifest_grows(
    tmp_path, team_env, monkeypatch
):
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "growing-data"},
        data={"dataset": "data/raw/tags/manifest.csv", "image_size": IMAGE_SIZE},
        **SMALL,
    )
    root = project / "data" / "raw" / "tags"
    rows = write_dataset(root, n=20, with_masks=True)
    write_manifest(root, rows)
    retrained = record_retraining(monkeypatch)

    first = feedback_round_flow(str(project))
    assert (first["round"], first["status"]) == (1, "done")
    before = PreparedData.load(project / "data" / "prepared")
    round_1 = answers(project, 1)
    assert len(round_1) == SMALL["query"]["k"]
    gone = sorted(round_1)[0]
    kept = [image_id for image_id in sorted(round_1) if image_id != gone]

    # new images listed first: every row moves; one answered image leaves the manifest
    write_manifest(root, added_images(root, n=4) + [r for r in rows if r["image"] != gone])
    second = feedback_round_flow(str(project))

    assert (second["round"], second["status"]) == (2, "done")
    assert second["data_version"] != first["data_version"]
    data = PreparedData.load(project / "data" / "prepared")
    moved = [
        i for i in kept if np.flatnonzero(data.ids == i)[0] != np.flatnonzero(before.ids == i)[0]
    ]
    assert moved == kept  # the rows the round recorded name other images now
    round_2 = answers(project, 2)
    assert not set(round_2) & set(round_1)  # nobody is asked twice

    trained = retrained[-1]
    assert trained["ids"] == kept + sorted(round_2)  # each round's rows, sorted by ID
    for j, image_id in enumerate(trained["ids"]):
        row = trained["rows"][j]
        assert np.array_equal(trained["W"][j], {**round_1, **round_2}[image_id]), image_id
        drawn = Image.open(root / image_id).resize((IMAGE_SIZE,) * 2, Image.BILINEAR)
        assert np.array_equal(data.images[row][0], np.asarray(drawn)), image_id
        assert data.classes[data.labels[row]] == Path(image_id).parent.name, image_id

    manifests = [str(project / "data" / "feedback" / f"round-{n}" / "manifest.csv") for n in (1, 2)]
    summary = read_feedback(manifests, data).summary()
    assert (summary["gone_count"], summary["gone"], summary["left_out"]) == (1, [gone], 1)
