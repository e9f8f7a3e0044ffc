"""services/labelstudio.py against a real Label Studio server (fixture `labelstudio`, tests/integration/ls_server.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from services import labelstudio as client_api
from xbl.errors import XblError
from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.oracle import Oracle, oracle_annotation
from xbl.labelstudio.results import masks_from_annotations

from .ls_server import REPO, free_port

pytestmark = [pytest.mark.labelstudio, pytest.mark.integration]

SIZE, CELL = 28, 4
SHOWN = [(0, 0), (0, 6), (3, 3), (6, 0)]  # the model's top cells, outlined for the annotator
IGNORED = [(0, 0), (0, 6), (6, 0)]  # the shown cells off the digit (worked out by hand)


def relevance_mask() -> np.ndarray:
    """The true evidence: the digit in the middle, cells (2..4, 2..4)."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:20, 8:20] = True
    return mask


def make_queries(tmp_path, image_ids, round_=1) -> list[dict]:
    rng = np.random.default_rng(0)
    queries = []
    for image_id in image_ids:
        image, overlay = tmp_path / f"{image_id}.png", tmp_path / f"{image_id}-overlay.png"
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).resize((112, 112)).save(
            image
        )
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(overlay)
        queries.append(
            {
                "image_id": image_id,
                "image_path": image,
                "overlay_path": overlay,
                "true_label": 3,
                "predicted_label": 8,
                "entropy": 1.5,
                "round": round_,
                "cells": SHOWN,
                "cell": CELL,
                "height": SIZE,
                "width": SIZE,
            }
        )
    return queries


@pytest.fixture
def client(labelstudio):
    return client_api.connect(labelstudio.url, labelstudio.token)


def test_push_oracle_collect_gives_exactly_the_ignored_and_kept_cells(
    client, labelstudio, tmp_path
):
    project = client_api.ensure_project(client, "xbl-test-roundtrip", "model-1")
    queries = make_queries(tmp_path, ["img-a", "img-b", "img-c"])
    assert client_api.push_round(client, project, queries, "model-1") == {
        "created": 3,
        "skipped": 0,
    }
    assert client_api.round_progress(client, project, 1) == (0, 3)
    settings = client.sdk.projects.get(project)
    assert (
        settings.model_version == "model-1" and settings.show_collab_predictions
    )  # cells pre-drawn

    # the uploaded image is served back to a logged-in annotator (and to no one else)
    task = next(iter(client.sdk.tasks.list(project=project)))
    url = labelstudio.url + task.data["image"]
    served = httpx.get(
        url, headers={"Authorization": f"Token {labelstudio.token}"}, trust_env=False
    )
    assert served.status_code == 200
    assert served.content == (tmp_path / f"{task.data['image_id']}.png").read_bytes()
    assert httpx.get(url, trust_env=False).status_code == 401

    relevance = {q["image_id"]: relevance_mask() for q in queries}
    answer = Oracle(relevance, max_overlap=0.1).annotate
    assert client_api.answer_open_tasks(client, project, 1, answer) == 3
    assert client_api.answer_open_tasks(client, project, 1, answer) == 0
    assert client_api.round_progress(client, project, 1) == (3, 3)

    annotations = client_api.collect_annotations(client, project, 1)
    masks, keep, ratings, problems, _ = masks_from_annotations(annotations, SIZE, SIZE)
    assert problems == [] and set(masks) == set(keep) == {"img-a", "img-b", "img-c"}
    expected = cells_to_mask(IGNORED, CELL, SIZE, SIZE)
    on_digit = cells_to_mask([c for c in SHOWN if c not in IGNORED], CELL, SIZE, SIZE)
    for image_id, mask in masks.items():
        np.testing.assert_array_equal(mask, expected)
        np.testing.assert_array_equal(keep[image_id], on_digit)  # the shown cell left as evidence
    assert set(ratings.values()) == {"bad"}


def test_pushing_a_round_again_creates_no_duplicates(client, tmp_path):
    project = client_api.ensure_project(client, "xbl-test-idempotent", "model-1")
    queries = make_queries(tmp_path, ["img-a", "img-b"])
    assert client_api.push_round(client, project, queries, "model-1") == {
        "created": 2,
        "skipped": 0,
    }
    assert client_api.push_round(client, project, queries, "model-1") == {
        "created": 0,
        "skipped": 2,
    }
    more = queries + make_queries(tmp_path, ["img-c"])
    assert client_api.push_round(client, project, more, "model-1") == {"created": 1, "skipped": 2}
    # the same image in a later round is a new task
    later = make_queries(tmp_path, ["img-a"], round_=2)
    assert client_api.push_round(client, project, later, "model-2") == {"created": 1, "skipped": 0}
    assert client_api.round_progress(client, project, 1) == (0, 3)
    assert client_api.round_progress(client, project, 2) == (0, 1)
    assert client_api.ensure_project(client, "xbl-test-idempotent", "model-2") == project


def test_wait_for_round_rides_out_a_server_outage(client, labelstudio, tmp_path, caplog):
    project = client_api.ensure_project(client, "xbl-test-outage", "model-1")
    queries = make_queries(tmp_path, ["img-a", "img-b"])
    client_api.push_round(client, project, queries, "model-1")
    seen, outcome = [], {}

    def wait():
        outcome["progress"] = client_api.wait_for_round(
            lambda: client_api.connect(labelstudio.url, labelstudio.token),
            project,
            1,
            target=2,
            timeout_s=120,
            poll_s=0.5,
            on_progress=lambda done, total: seen.append((done, total)),
        )

    caplog.set_level(logging.WARNING, logger="services.labelstudio")
    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        time.sleep(1.5)
        labelstudio.stop()
        time.sleep(3)
        assert waiter.is_alive()  # the outage is waited out, not fatal
    finally:
        labelstudio.start()
    fresh = client_api.connect(labelstudio.url, labelstudio.token)
    relevance = {q["image_id"]: relevance_mask() for q in queries}
    assert client_api.answer_open_tasks(fresh, project, 1, Oracle(relevance, 0.1).annotate) == 2
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert outcome["progress"] == (2, 2)
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
    assert any("unreachable" in record.getMessage() for record in caplog.records)
    assert labelstudio.token not in caplog.text


def test_malformed_annotation_is_reported_by_task_and_the_rest_is_kept(client, tmp_path):
    project = client_api.ensure_project(client, "xbl-test-malformed", "model-1")
    queries = make_queries(tmp_path, ["img-a", "img-b"])
    client_api.push_round(client, project, queries, "model-1")
    tasks = {t.data["image_id"]: t.id for t in client.sdk.tasks.list(project=project)}
    kept = oracle_annotation([(0, 0)], CELL, SIZE, SIZE, relevance_mask(), 0.1)[:1]
    outside = {
        "id": "far-away",
        "from_name": "cells",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": SIZE,
        "original_height": SIZE,
        "value": {
            "x": 150,
            "y": 0,
            "width": 10,
            "height": 10,
            "rotation": 0,
            "rectanglelabels": ["ignore"],
        },
    }
    unknown = {
        **outside,
        "id": "cat-box",
        "value": {**outside["value"], "x": 50, "rectanglelabels": ["cat"]},
    }
    client.sdk.annotations.create(
        tasks["img-a"], result=kept + [outside, unknown], was_cancelled=False
    )
    answer = Oracle({"img-b": relevance_mask()}, 0.1).annotate
    assert client_api.answer_open_tasks(client, project, 1, answer) == 1

    masks, _, _, problems, _ = masks_from_annotations(
        client_api.collect_annotations(client, project, 1), SIZE, SIZE
    )
    assert len(problems) == 2
    assert all(p.startswith(f"task {tasks['img-a']} (image img-a") for p in problems)
    assert any("far-away" in p for p in problems) and any("'cat'" in p for p in problems)
    np.testing.assert_array_equal(masks["img-a"], cells_to_mask([(0, 0)], CELL, SIZE, SIZE))
    np.testing.assert_array_equal(masks["img-b"], cells_to_mask(IGNORED, CELL, SIZE, SIZE))


def test_connect_fails_clearly_and_never_shows_the_token(labelstudio):
    client = client_api.connect(labelstudio.url, labelstudio.token)
    assert labelstudio.token not in repr(client)
    with pytest.raises(client_api.LabelStudioError, match="rejected the API token") as err:
        client_api.connect(labelstudio.url, "0" * 40)
    assert "0" * 40 not in str(err.value)
    assert isinstance(err.value, XblError)  # the user's to fix: a task never retries it
    with pytest.raises(client_api.LabelStudioUnavailable, match="not reachable"):
        client_api.connect(f"http://127.0.0.1:{free_port()}", labelstudio.token)


def test_start_refuses_a_taken_port(labelstudio, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XBL_LABEL_STUDIO_")}
    env.update(
        XBL_LABEL_STUDIO_HOME=str(tmp_path / "home"), XBL_LABEL_STUDIO_PORT=str(labelstudio.port)
    )
    done = subprocess.run(
        ["bash", str(REPO / "infra" / "labelstudio.sh"), "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"port {labelstudio.port}" in done.stderr and "already in use" in done.stderr
    assert labelstudio.token not in done.stdout + done.stderr
    status = subprocess.run(
        ["bash", str(REPO / "infra" / "labelstudio.sh"), "status"],
        env={**env, "XBL_LABEL_STUDIO_HOME": str(labelstudio.home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and labelstudio.url in status.stdout
