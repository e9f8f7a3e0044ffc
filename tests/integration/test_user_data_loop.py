"""The whole round on a user's own images, against the real Label Studio: an RGB folder layout
without masks, and a greyscale manifest with relevance masks, confounder masks and an audit
split. Shapes stand for the evidence; a coloured corner tag is the shortcut."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from flows.loop import feedback_round_flow
from services import tracking
from tests.integration.project import make_project
from xbl.data.prepared import AUDIT, PreparedData

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

SIZE = 40  # drawn at 40 px, prepared at 32: the grid does not line up with the tag
SMALL = {
    "train": {"epochs": 3, "patience": 0, "batch_size": 32},
    "feedback": {"epochs": 2},
    "query": {"k": 4, "grid_cell": 4, "top_cells": 6},
}


def draw(
    label: int, tag_codes_label: bool, rng, tags=((220, 30, 30), (30, 30, 220))
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(RGB image, relevance mask, confounder mask): a circle (0) or a square (1) somewhere in
    the middle, and a 6-px tag in a random corner, red for 0 and blue for 1 when it codes the
    label, of a random colour otherwise."""
    image = Image.new("RGB", (SIZE, SIZE), (20, 20, 20))
    relevance, confounder = Image.new("L", (SIZE, SIZE)), Image.new("L", (SIZE, SIZE))
    x, y, r = rng.integers(12, 28), rng.integers(12, 28), rng.integers(5, 8)
    box = (x - r, y - r, x + r, y + r)
    for canvas, fill in (
        (ImageDraw.Draw(image), (230, 230, 230)),
        (ImageDraw.Draw(relevance), 255),
    ):
        (canvas.ellipse if label == 0 else canvas.rectangle)(box, fill=fill)
    colour = label if tag_codes_label else int(rng.integers(0, 2))
    cx, cy = rng.choice([1, SIZE - 7]), rng.choice([1, SIZE - 7])
    tag = (cx, cy, cx + 5, cy + 5)
    ImageDraw.Draw(image).rectangle(tag, fill=tags[colour])
    ImageDraw.Draw(confounder).rectangle(tag, fill=255)
    return image, relevance, confounder


def write_dataset(root, n: int, with_masks: bool, seed: int = 0, **tags) -> list[dict]:
    """n images per class; manifest rows (train/val coded, test/audit random)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(("circle", "square")):
        for i in range(n):
            split = ("train",) * 6 + ("val", "val", "test", "audit")
            split = split[i % len(split)]
            image, relevance, confounder = draw(label, split in ("train", "val"), rng, **tags)
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            image_file = folder / f"{i:03d}.png"
            row = {"image": f"{name}/{i:03d}.png", "label": name, "split": split}
            if with_masks:
                image = image.convert("L")
                relevance.save(folder / f"{i:03d}-mask.png")
                confounder.save(folder / f"{i:03d}-tag.png")
                row |= {
                    "mask": f"{name}/{i:03d}-mask.png",
                    "confounder_mask": f"{name}/{i:03d}-tag.png",
                }
            image.save(image_file)
            rows.append(row)
    return rows


@pytest.fixture
def team_env(labelstudio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)


def run_round(project, experiment: str) -> tuple[dict, PreparedData]:
    result = feedback_round_flow(str(project))
    assert (result["round"], result["status"]) == (1, "done")
    data = PreparedData.load(project / "data" / "prepared")
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    run = client.get_run(result["feedback"]["run_id"])
    assert run.data.tags[tracking.DATA_VERSION_TAG] == result["data_version"]
    assert run.data.tags[tracking.PROMOTION_TAG] == result["promotion"]["reason"]
    return result, data


def test_an_rgb_folder_without_masks_runs_the_round(tmp_path, team_env):
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "user-rgb-folder"},
        data={"dataset": "data/raw/shapes", "image_size": 32},
        **SMALL,
    )
    write_dataset(project / "data" / "raw" / "shapes", n=20, with_masks=False)

    result, data = run_round(project, "user-rgb-folder")

    assert data.images.shape[1:] == (3, 32, 32)  # auto: colour images stay RGB
    assert set(data.ids) >= {"circle/000.png", "square/000.png"}  # same file name, two ids
    assert not data.confounder.any()  # nothing known about the shortcut
    # no audit rows in a folder layout, no relevance masks, so no cell was marked "ignore":
    # nothing shortcut-free to judge by, and the reason says how to get some
    assert "audit_accuracy" not in result["feedback"]["metrics"]
    assert not result["promotion"]["promoted"]
    assert result["promotion"]["reason"].startswith("no shortcut-free evidence")
    assert "split=audit" in result["promotion"]["reason"]
    manifest = project / "data" / "feedback" / "round-1" / "manifest.csv"
    with manifest.open() as fh:
        assert len(list(csv.DictReader(fh))) == 4  # every query answered, masks saved


def test_a_manifest_with_relevance_and_confounder_masks_is_judged_on_its_audit_rows(
    tmp_path, team_env
):
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "user-manifest"},
        data={"dataset": "data/raw/tags/manifest.csv", "image_size": 32},
        **SMALL,
    )
    root = project / "data" / "raw" / "tags"
    rows = write_dataset(root, n=20, with_masks=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "label", "split", "mask", "confounder_mask"])
        writer.writeheader()
        writer.writerows(rows)

    result, data = run_round(project, "user-manifest")

    assert data.images.shape[1] == 1 and data.confounder.any()
    metrics = result["feedback"]["metrics"]
    for key in (
        "audit_accuracy",
        "val_explanation_score",
        "test_wrong_reason_share_deeplift",
        "test_outside_share_deeplift",
    ):
        assert key in metrics, key
    assert result["promotion"]["evidence"].startswith("audit, 4 of 4 images")
    assert "McNemar p = " in result["promotion"]["reason"]
    # the oracle marked cells off the shapes: some answer says "ignore" somewhere
    masks = project / "data" / "feedback" / "round-1" / "masks"
    assert any(np.asarray(Image.open(p)).any() for p in masks.glob("*.png"))
    roles = {row["role"] for row in result["table"]}
    assert roles == {"baseline = champion", "candidate"}


def test_a_manifest_without_audit_rows_is_judged_on_its_counterfactual_audit(tmp_path, team_env):
    """No audit rows: the val split is confounded, so the old rule (val may drop 0.02) vetoed
    every real fix. The answers' "ignore" marks build the counterfactual audit instead, where
    the shortcut model loses what val credited it with. (That a fix is promoted there is
    tests/integration/test_promotion.py's, on decoy-digits without its audit rows.)"""
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "user-no-audit"},
        data={"dataset": "data/raw/tags/manifest.csv", "image_size": 32},
        query={"grid_cell": 4, "top_cells": 6},
    )
    root = project / "data" / "raw" / "tags"
    # a tag as bright as the shapes, or half as bright: a shortcut a small CNN takes at once
    rows = write_dataset(root, n=150, with_masks=True, seed=1, tags=((250,) * 3, (110,) * 3))
    for row in rows:
        row["split"] = "test" if row["split"] == "audit" else row["split"]
        del row["confounder_mask"]  # what the user knows: where the evidence is, no more
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "label", "split", "mask"])
        writer.writeheader()
        writer.writerows(rows)

    result, data = run_round(project, "user-no-audit")

    assert AUDIT not in set(data.split) and not data.confounder.any()
    promotion = result["promotion"]
    assert promotion["evidence"].startswith("counterfactual audit, 60 of 60 images"), promotion
    assert "McNemar p = " in promotion["reason"] and 0 <= promotion["p_value"] <= 1
    baseline_val = result["baseline"]["metrics"]["val_accuracy"]
    assert baseline_val > 0.95  # the shortcut: val credits it fully
    # on the counterfactual audit the shortcut model is near chance, as on the random-tag test
    champion_cf = promotion["champion_accuracy"]
    assert champion_cf < 0.75 and abs(champion_cf - result["table"][0]["test_accuracy"]) < 0.15
