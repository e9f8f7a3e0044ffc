"""Every answer read: after a round has finished, an answer edited, one deleted and one given late
in the real Label Studio are all reported, and the stored masks follow them (issue 24, item 3)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from prefect import flow

from services import labelstudio as ls
from tasks.annotation import collect_feedback_masks, recollect_finished_rounds
from xbl.data.prepared import PreparedData
from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.oracle import Oracle
from xbl.paths import feedback_dir

from .ls_server import free_port
from .test_labelstudio_server import CELL, IGNORED, SHOWN, SIZE, make_queries, relevance_mask

pytestmark = [pytest.mark.labelstudio]

IMAGES = ["img-a", "img-b", "img-c", "img-d"]


@flow
def collect_round_1(project_id: int, queries: str, out: str) -> str:
    return collect_feedback_masks(project_id, 1, queries, out)


@flow
def recollect(project: str, project_id: int, dataset: str) -> dict:
    return recollect_finished_rounds(project, project_id, [1], dataset)


def prepared(folder, ids) -> str:
    n = len(ids)
    empty = np.zeros((n, SIZE, SIZE), bool)
    PreparedData(
        np.zeros((n, 1, SIZE, SIZE), np.uint8),
        np.zeros(n, np.int64),
        np.array(["train"] * n),
        empty,
        empty,
        np.array(ids),
        np.array(["3", "8"]),
    ).save(folder)
    return str(folder)


def stored(project) -> dict[str, np.ndarray]:
    out = feedback_dir(project, 1)
    with open(out / "manifest.csv", newline="") as fh:
        return {
            r["image_id"]: np.asarray(Image.open(out / r["mask"])) > 0 for r in csv.DictReader(fh)
        }


def test_edited_deleted_and_late_answers_are_reported_and_used(labelstudio, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    client = ls.connect()
    project_id = ls.ensure_project(client, "xbl-test-every-answer", "model-1")
    queries = make_queries(tmp_path, IMAGES)
    ls.push_round(client, project_id, queries, "model-1")
    oracle = Oracle({i: relevance_mask() for i in IMAGES}, max_overlap=0.1)
    late_one = lambda shown: None if shown["image_id"] == "img-d" else oracle.annotate(shown)  # noqa: E731
    assert ls.answer_open_tasks(client, project_id, 1, late_one) == 3  # img-d: the round timed out

    project = tmp_path / "project"
    queries_json = tmp_path / "queries.json"
    rows = [
        {"image_id": i, "index": n, "round": 1, "height": SIZE, "width": SIZE}
        for n, i in enumerate(IMAGES)
    ]
    queries_json.write_text(json.dumps(rows))
    collect_round_1(project_id, str(queries_json), str(feedback_dir(project, 1)))
    assert set(stored(project)) == {"img-a", "img-b", "img-c"}

    # after the round: img-a's answer is edited, img-b's deleted, img-d answered late
    tasks = {t["image_id"]: t for t in ls.collect_answers(client, project_id, 1)}
    edited = [
        {**r, "value": {**r["value"], "rectanglelabels": ["ignore"]}}
        if r["type"] == "rectanglelabels"
        else r
        for r in tasks["img-a"]["answers"][0]["result"]
    ]
    client.sdk.annotations.update(tasks["img-a"]["answers"][0]["annotation_id"], result=edited)
    client.sdk.annotations.delete(tasks["img-b"]["answers"][0]["annotation_id"])
    only_d = lambda shown: oracle.annotate(shown) if shown["image_id"] == "img-d" else None  # noqa: E731
    assert ls.answer_open_tasks(client, project_id, 1, only_d) == 1
    dataset = prepared(tmp_path / "prepared", IMAGES)

    # Label Studio unreachable: said so, and the stored masks stay as they were
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    before = stored(project)
    away = recollect(str(project), project_id, dataset)
    assert away["reachable"] is False and away["edited"] == away["deleted"] == away["late"] == 0
    assert stored(project).keys() == before.keys()

    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    summary = recollect(str(project), project_id, dataset)
    task_id = {i: t["task_id"] for i, t in tasks.items()}
    assert (summary["edited"], summary["deleted"], summary["late"], summary["unreadable"]) == (
        1,
        1,
        1,
        0,
    )
    changes = summary["rounds"][1]
    assert [c["task_id"] for c in changes["edited"]] == [task_id["img-a"]]
    assert [c["task_id"] for c in changes["deleted"]] == [task_id["img-b"]]
    assert [c["task_id"] for c in changes["late"]] == [task_id["img-d"]]

    masks = stored(project)
    assert set(masks) == {"img-a", "img-c", "img-d"}  # img-b's mask no longer trains
    every_shown = cells_to_mask(SHOWN, CELL, SIZE, SIZE)
    np.testing.assert_array_equal(masks["img-a"], every_shown)  # the edit struck every cell
    np.testing.assert_array_equal(masks["img-d"], cells_to_mask(IGNORED, CELL, SIZE, SIZE))
    out = feedback_dir(project, 1)
    assert not list(out.parent.glob(".round-1.*"))  # swapped in whole, nothing left beside it
    assert json.loads((out / "cost.json").read_text())["answers"] == 3

    again = recollect(str(project), project_id, dataset)  # nothing new: nothing rewritten
    assert (again["edited"], again["deleted"], again["late"]) == (0, 0, 0)

    # a wiped or replaced project (no task of the round at all) deletes no stored mask
    empty = ls.ensure_project(client, "xbl-test-every-answer-wiped", "model-1")
    wiped = recollect(str(project), empty, dataset)
    assert (wiped["deleted"], wiped["no_task"]) == (0, 3)
    assert stored(project).keys() == masks.keys()
