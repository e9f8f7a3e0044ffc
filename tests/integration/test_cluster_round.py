"""Cluster rounds: one answer on a cluster's representative, carried to its members, the masks in
doubt reviewed in Label Studio (xbl/labelstudio/interface.py, services/labelstudio.py, tasks/propagation.py,
flows/loop.py)."""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from services import labelstudio as ls
from tasks.propagation import collect_cluster_feedback
from xbl.data.prepared import PreparedData
from xbl.explain.cells import cells_to_mask
from xbl.explain.render import mask_png, montage_png
from xbl.feedback.cost import annotation_budget
from xbl.labelstudio.interface import (
    APPLIES,
    labeling_config,
    review_labeling_config,
    validate_labeling_config,
)
from xbl.labelstudio.oracle import (
    Oracle,
    oracle_accepts,
    oracle_annotation,
    oracle_seconds,
    review_result,
)
from xbl.labelstudio.payloads import decode_mask, encode_mask
from xbl.labelstudio.results import applies_to, relabelled_regions, review_verdict
from xbl.query.clustering import Propagated, triage

SIZE, CELL = 28, 4
SHOWN = [(0, 0), (0, 6), (3, 3), (6, 0)]
IGNORED = [(0, 0), (0, 6), (6, 0)]  # the shown cells off the digit
SECONDS = {"task": 8.0, "region": 2.0, "montage": 10.0, "review": 3.0}


def relevance_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:20, 8:20] = True
    return mask


# ---------------------------------------------------------------- pure parts
def test_the_cluster_and_review_interfaces_accept_what_the_oracle_submits():
    from label_studio_sdk.label_interface import LabelInterface

    root = ET.fromstring(labeling_config(cluster=True))
    images = {tag.get("name"): tag.get("value") for tag in root.iter("Image")}
    assert images == {"image": "$image", "overlay": "$overlay", "montage": "$montage"}
    applies = root.find(".//Choices[@name='applies_to']")
    assert [c.get("value") for c in applies.iter("Choice")] == list(APPLIES)
    assert validate_labeling_config(labeling_config(cluster=True)) == []
    answer = oracle_annotation(SHOWN, CELL, SIZE, SIZE, relevance_mask(), 0.1, "review")
    interface = LabelInterface(labeling_config(cluster=True))
    assert interface.validate_prediction({"result": answer}, return_errors=True) == []
    review = LabelInterface(review_labeling_config())
    for accept in (True, False):
        result = review_result(accept)
        assert review.validate_prediction({"result": result}, return_errors=True) == []
        assert review_verdict(result) is accept


def test_a_cluster_answer_applies_to_its_scope_only_when_something_was_marked():
    marked = oracle_annotation(SHOWN, CELL, SIZE, SIZE, relevance_mask(), 0.1, "all")
    assert applies_to(marked) == "all"
    assert relabelled_regions(marked) == len(IGNORED)
    on_digit = oracle_annotation([(3, 3)], CELL, SIZE, SIZE, relevance_mask(), 0.1, "all")
    assert applies_to(on_digit) == "none"  # nothing to ignore: nothing to carry
    assert applies_to([]) is None  # a person who chose nothing
    per_image = oracle_annotation(SHOWN, CELL, SIZE, SIZE, relevance_mask(), 0.1)
    assert applies_to(per_image) is None


def test_masks_travel_in_task_data_unchanged():
    mask = np.random.default_rng(0).random((SIZE, 30)) > 0.7
    assert np.array_equal(decode_mask(encode_mask(mask), SIZE, 30), mask)


def test_the_simulated_reviewer_accepts_only_masks_off_the_evidence():
    off = cells_to_mask([(0, 0)], CELL, SIZE, SIZE)
    on = cells_to_mask([(3, 3)], CELL, SIZE, SIZE)
    assert oracle_accepts(off, relevance_mask(), 0.1)
    assert not oracle_accepts(on, relevance_mask(), 0.1)
    assert not oracle_accepts(off | on, relevance_mask(), 0.1)  # half on the digit
    assert oracle_accepts(off | on, relevance_mask(), 0.5)
    assert not oracle_accepts(np.zeros((SIZE, SIZE), bool), relevance_mask(), 1.0)


def test_the_time_model_counts_each_action():
    assert oracle_seconds(SECONDS, "image", relabelled=3) == 8 + 3 * 2
    assert oracle_seconds(SECONDS, "cluster", relabelled=1) == 8 + 2 + 10
    assert oracle_seconds(SECONDS, "review") == 3


def test_triage_follows_the_answers_scope_and_the_masks_confidence():
    masks = np.zeros((4, SIZE, SIZE), bool)
    masks[:3, :4, :4] = True  # the last member: the concept was not found
    carried = Propagated(masks, np.array([0.9, 0.3, 0.6, 0.0]), np.zeros((4, 7, 7)))
    assert triage(carried, "all", 0.5).tolist() == ["confident", "review", "confident", "dropped"]
    assert triage(carried, "review", 0.5).tolist() == ["review"] * 3 + ["dropped"]
    assert triage(carried, "none", 0.5).tolist() == ["dropped"] * 4
    with pytest.raises(ValueError, match="scope"):
        triage(carried, "some", 0.5)


def test_the_montage_and_the_review_image_show_what_they_claim(tmp_path):
    images = np.random.default_rng(0).random((5, 1, SIZE, SIZE))
    attr = np.random.default_rng(1).random((5, SIZE, SIZE))
    with Image.open(montage_png(images, attr, tmp_path / "m.png", cols=4, tile=56)) as png:
        assert png.size == (4 * 56 + 3 * 4, 2 * 56 + 4)  # 5 tiles in 2 rows, 4 px gaps
    mask = cells_to_mask([(0, 0)], CELL, SIZE, SIZE)
    with Image.open(mask_png(np.zeros((1, SIZE, SIZE)), mask, tmp_path / "r.png", 10)) as png:
        rgb = np.asarray(png.convert("RGB"))
    assert rgb.shape == (280, 280, 3)
    assert rgb[20, 20, 0] > 100 and rgb[20, 20, 1] == 0  # red inside the mask
    assert rgb[200, 200].tolist() == [0, 0, 0]  # the black image elsewhere


# ---------------------------------------------------------------- against a real Label Studio
def _png(path, rng, size=SIZE * 4):
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return str(path)


def cluster_query(tmp_path, members: list[str]) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image_id": members[0],
        "index": 0,
        "image_path": _png(tmp_path / "rep.png", rng),
        "overlay_path": _png(tmp_path / "rep-overlay.png", rng),
        "montage_path": _png(tmp_path / "montage.png", rng, 200),
        "true_label": "3",
        "predicted_label": "8",
        "entropy": 1.5,
        "round": 1,
        "cells": SHOWN,
        "cell": CELL,
        "height": SIZE,
        "width": SIZE,
        "cluster": 4,
        "members": members,
    }


def carried(tmp_path, image_id: str, index: int, cells, status: str, conf: float) -> dict:
    mask = cells_to_mask(cells, CELL, SIZE, SIZE)
    record = {
        "image_id": image_id,
        "index": index,
        "round": 1,
        "cluster": 4,
        "representative": "rep",
        "confidence": conf,
        "status": status,
        "mask": encode_mask(mask),
        "height": SIZE,
        "width": SIZE,
    }
    if status == "review":
        png = mask_png(np.zeros((1, SIZE, SIZE)), mask, tmp_path / f"{image_id}_review.png", 4)
        record["image_path"] = str(png)
    return record


def test_review_verdicts_reach_the_masks(labelstudio, tmp_path, monkeypatch):
    """A cluster task and its reviews through the API: the representative's answer, a confident
    carried mask, an accepted review (its proposed mask trains) and a rejected one (no mask)."""
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    client = ls.connect()
    title = "xbl-test-cluster-review"
    project = ls.ensure_project(client, title, "model-1", cluster=True)
    query = cluster_query(tmp_path, ["rep", "sure", "good", "bad"])
    assert ls.push_round(client, project, [query], "model-1")["created"] == 1
    pushed = ls.round_task_data(client, project, 1)[0]
    assert pushed["members"] == ["rep", "sure", "good", "bad"] and pushed["montage"]
    oracle = Oracle({"rep": relevance_mask()}, 0.1, "all", SECONDS)
    assert ls.answer_open_tasks(client, project, 1, oracle.annotate)
    [answer] = ls.collect_annotations(client, project, 1)
    assert applies_to(answer["result"]) == "all"
    assert answer["lead_time"] == 8 + 2 * len(IGNORED) + 10  # the time model, as LS keeps it

    members = [
        carried(tmp_path, "sure", 1, [(6, 6)], "confident", 0.9),
        carried(tmp_path, "good", 2, [(0, 0)], "review", 0.3),  # off the digit: accepted
        carried(tmp_path, "bad", 3, [(3, 3)], "review", 0.2),  # on the digit: rejected
    ]
    propagation = tmp_path / "propagation.json"
    clusters = [{"carried": 3, "confident": 1, "review": 2}]
    propagation.write_text(json.dumps({"round": 1, "clusters": clusters, "members": members}))
    review = ls.ensure_review_project(client, title)
    assert ls.push_reviews(client, review, members[1:]) == {"created": 2, "skipped": 0}
    assert ls.push_reviews(client, review, members[1:]) == {"created": 0, "skipped": 2}
    relevance = {m["image_id"]: relevance_mask() for m in members}
    reviewer = Oracle(relevance, 0.1, seconds=SECONDS)
    assert ls.answer_open_tasks(client, review, 1, reviewer.review) == 2
    assert ls.round_progress(client, review, 1) == (2, 2)

    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([{k: v for k, v in query.items() if "path" not in k}]))
    out = tmp_path / "feedback" / "round-1"
    manifest = collect_cluster_feedback.fn(
        project, review, 1, str(queries), str(propagation), str(out)
    )
    with open(manifest, newline="") as fh:
        rows = {r["image_id"]: r for r in csv.DictReader(fh)}
    assert {k: r["source"] for k, r in rows.items()} == {
        "rep": "answer",
        "sure": "propagated",
        "good": "reviewed",
    }  # "bad" was rejected: no mask, no row
    saved = {k: np.asarray(Image.open(out / r["mask"])) > 0 for k, r in rows.items()}
    assert np.array_equal(saved["rep"], cells_to_mask(IGNORED, CELL, SIZE, SIZE))
    assert np.array_equal(saved["sure"], cells_to_mask([(6, 6)], CELL, SIZE, SIZE))
    assert np.array_equal(saved["good"], cells_to_mask([(0, 0)], CELL, SIZE, SIZE))
    assert float(rows["good"]["confidence"]) == 0.3 and rows["rep"]["confidence"] == ""
    assert float(rows["good"]["annotator_seconds"]) == 3.0
    cost = json.loads((out / "cost.json").read_text())
    assert (cost["tasks_opened"], cost["members_reviewed"], cost["regions_relabelled"]) == (3, 2, 3)
    assert (cost["accepted"], cost["rejected"], cost["confident"]) == (1, 1, 1)
    # the rejected review cost time too: the budget counts every task
    assert annotation_budget([manifest]) == {
        "answers": 1,
        "reviews": 2,
        "annotator_seconds": 24.0 + 2 * 3.0,
    }


# ---------------------------------------------------------------- the whole round
@pytest.fixture(scope="module")
def cluster_round(tmp_path_factory, labelstudio):
    from flows.loop import feedback_round_flow
    from tests.integration.project import make_project

    mp = pytest.MonkeyPatch()
    mp.setenv("LABEL_STUDIO_URL", labelstudio.url)
    mp.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    project = make_project(
        tmp_path_factory.mktemp("cluster") / "project",
        mlflow={"experiment": "loop-cluster"},
        train={"epochs": 6, "patience": 0},
        feedback={"epochs": 6},
        # a confidence bar above most carried masks' (their peaks are clipped at 1), so the
        # round has confident masks and masks in review
        query={
            "strategy": "cluster",
            "k": 3,
            "cluster_pool": 200,
            "clusters_max": 6,
            "review_confidence": 1.0,
        },
    )
    try:
        yield project, feedback_round_flow(str(project))
    finally:
        mp.undo()


def _manifest(project) -> dict[str, dict]:
    with open(project / "data" / "feedback" / "round-1" / "manifest.csv", newline="") as fh:
        return {row["image_id"]: row for row in csv.DictReader(fh)}


def test_one_cluster_task_per_chosen_cluster_with_its_montage_and_members(
    cluster_round, labelstudio
):
    project, result = cluster_round
    rounds = project / "data" / "rounds" / "round-1"
    clusters = json.loads((rounds / "clusters.json").read_text())
    client = ls.connect(labelstudio.url, labelstudio.token)
    pid = ls.pushed_rounds(client, "xbl-loop-cluster").project_id
    tasks = ls.round_task_data(client, pid, 1)
    assert [t["image_id"] for t in tasks] == clusters["queried"] and len(tasks) == 3
    for t in tasks:
        assert t["members"] in clusters["members"] and t["image_id"] in t["members"]
        assert t["montage"].startswith("/data/upload/") and len(t["cells"]) == 8
    assert ls.round_progress(client, pid, 1) == (3, 3)  # the oracle answered each
    # the project shows the cluster interface: the montage and whom the answer applies to
    config = client.sdk.projects.get(pid).label_config
    assert config == labeling_config(cluster=True)


def test_only_confident_or_accepted_carried_masks_train(cluster_round, labelstudio):
    project, result = cluster_round
    data = PreparedData.load(project / "data" / "prepared")
    propagation = json.loads(
        (project / "data" / "rounds" / "round-1" / "propagation.json").read_text()
    )
    rows = _manifest(project)
    feedback = project / "data" / "feedback" / "round-1"
    client = ls.connect(labelstudio.url, labelstudio.token)
    review = ls.pushed_rounds(client, ls.review_title("xbl-loop-cluster")).project_id
    reviews = {r["image_id"]: r for r in ls.collect_reviews(client, review, 1)}
    members = propagation["members"]
    confident = [m for m in members if m["status"] == "confident"]
    in_review = [m for m in members if m["status"] == "review"]
    assert confident and in_review  # both paths taken
    assert set(reviews) == {m["image_id"] for m in in_review}  # every doubtful mask reviewed
    accepted = 0
    for m in members:
        proposed = decode_mask(m["mask"], m["height"], m["width"])
        if m["status"] == "review":
            verdict = oracle_accepts(proposed, data.relevance[m["index"]], 0.1)
            assert reviews[m["image_id"]]["accepted"] is verdict
            if not verdict:
                assert m["image_id"] not in rows  # rejected: no mask
                continue
            accepted += 1
        row = rows[m["image_id"]]
        assert row["source"] == ("propagated" if m["status"] == "confident" else "reviewed")
        saved = np.asarray(Image.open(feedback / row["mask"])) > 0
        assert np.array_equal(saved, proposed)  # the carried mask, as proposed
    assert 0 < accepted < len(in_review)  # the reviewer said both
    answers = [r for r in rows.values() if r["source"] == "answer"]
    assert len(answers) == 3 and len(rows) == 3 + len(confident) + accepted


def test_a_cluster_round_logs_its_clusters_spread_and_cost(cluster_round):
    from mlflow import MlflowClient

    from services import tracking

    project, result = cluster_round
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    run = client.get_run(result["feedback"]["run_id"])
    cost = json.loads((project / "data" / "feedback" / "round-1" / "cost.json").read_text())
    clusters = json.loads((project / "data" / "rounds" / "round-1" / "clusters.json").read_text())
    assert run.data.params["cluster.k"] == str(clusters["k"])
    assert run.data.params["cluster.selection"] == "eigengap"
    assert run.data.params["cluster.tasks"] == "3"
    metrics = run.data.metrics
    for key in ("propagated_masks", "confident", "reviewed", "accepted", "rejected"):
        assert metrics[f"round/{key}"] == cost[key], key
    assert cost["reviewed"] == cost["accepted"] + cost["rejected"] == cost["members_reviewed"]
    # the time model: each task opened and each region relabelled, each review
    expected = 3 * (8.0 + 10.0) + 2.0 * cost["regions_relabelled"] + 3.0 * cost["reviewed"]
    assert metrics["round/annotator_seconds"] == metrics["annotator_seconds"] == expected
    steps = client.get_metric_history(run.info.run_id, "round/task_seconds")
    assert len(steps) == cost["tasks_opened"] == 3 + cost["reviewed"]
    artifacts = {
        a.path
        for d in ("clusters", "annotation")
        for a in client.list_artifacts(run.info.run_id, d)
    }
    assert artifacts == {"clusters/clusters.json", "annotation/cost.json"}
    parent = client.list_artifacts(result["parent_run_id"], "clusters")
    assert [a.path for a in parent] == ["clusters/clusters.json"]
    candidate = next(row for row in result["table"] if row["role"] == "candidate")
    base = next(row for row in result["table"] if row["role"].startswith("baseline"))
    assert candidate["annotator_seconds"] == expected
    gain = (candidate["audit_accuracy"] - base["audit_accuracy"]) / (expected / 60)
    assert candidate["audit_gain_per_annotator_minute"] == pytest.approx(gain, abs=1e-3)


def test_the_retraining_learns_from_the_cluster_masks(cluster_round):
    project, result = cluster_round
    assert result["status"] == "done"
    dvc_file = (project / "data" / "feedback.dvc").read_text()
    assert result["feedback_version"] in dvc_file  # the round's masks are versioned
    rows = {r["role"]: r for r in result["table"]}
    before, after = rows["baseline = champion"], rows["candidate"]
    # a handful of answers, carried to their clusters, already move the model off the decoys:
    # by a clear step, not by a strict inequality on 4-place figures that a seed could flip
    assert after["audit_accuracy"] >= before["audit_accuracy"] + 0.02, (before, after)
    key = "test_wrong_reason_share_deeplift"
    assert after[key] <= 0.5 * before[key], (key, before[key], after[key])


def test_a_cluster_round_waits_for_its_reviews_across_runs(tmp_path, labelstudio, monkeypatch):
    """`wait.mode: resume` with people annotating: a run pushes the cluster tasks and ends; a
    later run carries the answers and pushes the reviews, and ends; the next retrains. The
    masks carried again in each run are the same, so no review task is pushed twice."""
    import subprocess
    import sys

    from flows.loop import feedback_round_flow
    from tests.integration.project import make_project

    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "loop-cluster-resume"},
        train={"epochs": 3, "patience": 0},
        feedback={"epochs": 2},
        query={"strategy": "cluster", "k": 2, "cluster_pool": 120, "clusters_max": 4},
        labelstudio={"annotator": "human", "oracle_scope": "review"},
        wait={"mode": "resume"},
    )

    def annotate() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "annotate", "--oracle"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = feedback_round_flow(str(project))
    assert (first["status"], first["what"], first["annotated"]) == ("waiting", "annotations", 0)
    assert "oracle annotated 2 task(s) of round 1" in annotate()
    second = feedback_round_flow(str(project))
    assert (second["status"], second["what"], second["annotated"]) == ("waiting", "reviews", 0)
    assert second["total"] > 0 and not (project / "data" / "feedback").exists()
    assert f"oracle reviewed {second['total']} carried mask(s)" in annotate()
    third = feedback_round_flow(str(project))
    assert (third["round"], third["status"]) == (1, "done")
    with open(project / "data" / "feedback" / "round-1" / "manifest.csv", newline="") as fh:
        sources = [row["source"] for row in csv.DictReader(fh)]
    assert sources.count("answer") == 2 and "propagated" not in sources  # scope: review
    client = ls.connect()
    review = ls.pushed_rounds(client, ls.review_title("xbl-loop-cluster-resume")).project_id
    assert ls.round_progress(client, review, 1) == (second["total"], second["total"])


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")
def test_a_cluster_task_and_a_review_task_render_in_the_browser(
    cluster_round, labelstudio, tmp_path_factory
):
    """What a person sees, in headless Chromium: the representative with the oracle's answer
    (cells relabelled, scope chosen), the explanation, the members' montage; then a review."""
    from playwright.sync_api import expect, sync_playwright

    from tests.integration.test_browser import CHROMIUM_ARGS, ERRORS, assert_not_blank, log_in

    shots = tmp_path_factory.mktemp("cluster-screenshots")
    client = ls.connect(labelstudio.url, labelstudio.token)
    main = ls.pushed_rounds(client, "xbl-loop-cluster").project_id
    review = ls.pushed_rounds(client, ls.review_title("xbl-loop-cluster")).project_id
    task = ls.round_task_data(client, main, 1)[0]
    review_task = next(iter(client.sdk.tasks.list(project=review))).id
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        log_in(page, labelstudio)
        page.goto(f"{labelstudio.url}/projects/{main}/data")
        page.get_by_text(f"image {task['image_id']} · round 1 ·").first.click()
        images = page.locator(".lsf-main-view .lsf-image img")
        # the representative, its explanation, the montage
        expect(images).to_have_count(3, timeout=30_000)
        for img in images.all():
            page.wait_for_function(
                "(i) => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=30_000
            )
        expect(page.locator(".lsf-outliner-item")).to_have_count(8, timeout=30_000)
        expect(page.get_by_text("members after review")).to_be_visible()
        page.wait_for_timeout(600)  # let the canvas paint the regions
        assert page.locator(ERRORS).count() == 0
        page.screenshot(path=str(shots / "cluster-task.png"))
        assert_not_blank(shots / "cluster-task.png", images.nth(2).bounding_box())
        page.goto(f"{labelstudio.url}/projects/{review}/data?task={review_task}")
        shown = page.locator(".lsf-main-view .lsf-image img")
        expect(shown).to_have_count(1)  # the member with the carried mask drawn
        page.wait_for_function(
            "(i) => i.complete && i.naturalWidth > 0", arg=shown.element_handle(), timeout=30_000
        )
        # the reviewer's one click, as the oracle gave it (a choice's text carries its hotkey)
        expect(page.get_by_text("reject").first).to_be_visible(timeout=30_000)
        page.wait_for_timeout(600)
        page.screenshot(path=str(shots / "review-task.png"))
        assert_not_blank(shots / "review-task.png")
        browser.close()
    print(f"screenshots in {shots}")
