"""The product end to end: one feedback round through a real Label Studio server."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from flows.loop import feedback_round_flow
from services import labelstudio as ls
from services import tracking
from services.checkout import checkout_run_data
from tasks.annotation import RoundIncomplete
from tasks.rounds import read_round_state
from tests.integration.project import make_project
from xbl.data.prepared import PreparedData
from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.oracle import oracle_ignore_cells

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]


@pytest.fixture
def team_server(labelstudio, monkeypatch):
    """Point the pipeline at the test server as a team would: URL + token from the env."""
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    return labelstudio


@pytest.fixture(scope="module")
def oracle_round(tmp_path_factory, labelstudio):
    mp = pytest.MonkeyPatch()
    mp.setenv("LABEL_STUDIO_URL", labelstudio.url)
    mp.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    project = make_project(
        tmp_path_factory.mktemp("loop") / "project", mlflow={"experiment": "loop-oracle"}
    )
    try:
        yield project, feedback_round_flow(str(project))
    finally:
        mp.undo()


def test_masks_are_exactly_the_oracles_ignored_cells(oracle_round):
    project, result = oracle_round
    data = PreparedData.load(project / "data" / "prepared")
    queries = json.loads((project / "data" / "rounds" / "round-1" / "queries.json").read_text())
    feedback = project / "data" / "feedback" / "round-1"
    assert len(queries) == 25
    marked = 0
    for q in queries:
        expected = cells_to_mask(
            oracle_ignore_cells(
                [tuple(c) for c in q["cells"]], q["cell"], data.relevance[q["index"]], 0.1
            ),
            q["cell"],
            q["height"],
            q["width"],
        )
        saved = np.asarray(Image.open(feedback / "masks" / f"{q['image_id']}.png")) > 0
        assert np.array_equal(saved, expected), q["image_id"]
        marked += bool(expected.any())
    assert marked > 0  # the oracle did flag something


def test_round_is_tracked_and_versioned(oracle_round):
    project, result = oracle_round
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    run = client.get_run(result["feedback"]["run_id"])
    assert run.info.run_name == "feedback-round-1"
    assert run.data.tags[tracking.FEEDBACK_VERSION_TAG] == result["feedback_version"]
    assert run.data.tags[tracking.DATA_VERSION_TAG] == result["data_version"]
    dvc_file = (project / "data" / "feedback.dvc").read_text()
    assert result["feedback_version"] in dvc_file
    assert {"feedback.dvc", "dvc.lock"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    for key in (
        "test_wrong_reason_share_inputgrad",
        "test_activation_recall_gradcam",
        "val_explanation_score",
    ):
        assert key in run.data.metrics
    assert client.get_model_version_by_alias("xbl-classifier", "champion") is not None


def test_comparison_table_is_read_back_from_mlflow(oracle_round):
    _, result = oracle_round
    rows = {row["role"]: row for row in result["table"]}
    # round 1: no champion yet, so the baseline stands in for it
    assert set(rows) == {"baseline = champion", "candidate"}
    assert rows["candidate"]["model"] == "feedback-round-1"
    assert rows["candidate"]["audit_accuracy"] == round(
        result["feedback"]["metrics"]["audit_accuracy"], 4
    )


def test_feedback_beats_the_baseline_on_shortcut_free_evidence_and_is_promoted(oracle_round):
    _, result = oracle_round
    rows = {row["role"]: row for row in result["table"]}
    before, after = rows["baseline = champion"], rows["candidate"]
    # Margins, not strict inequalities on 4-place figures: the round must move the model off
    # the decoy by a clear step on any seed or thread count (the demo: audit 0.75 -> 0.96).
    assert after["audit_accuracy"] >= before["audit_accuracy"] + 0.05
    assert after["test_accuracy"] >= before["test_accuracy"] + 0.05
    # The explainers the feedback acts through put at most half as much on the decoy ...
    for explainer in ("deeplift", "inputgrad"):
        key = f"test_wrong_reason_share_{explainer}"
        assert after[key] <= 0.5 * before[key], (key, before[key], after[key])
    # ... while GradCAM, which no feedback term optimises, cannot resolve a 4-px decoy on this
    # 28-px model at all: its coarse map puts about the decoy's area share (16/784 = 0.02) on
    # it before and after (0.0196 -> 0.019 to 0.030 across thread counts), so it is held only
    # to stay near that level, not to fall.
    key = "test_wrong_reason_share_gradcam"
    assert after[key] <= 0.05, (key, before[key], after[key])
    assert result["promotion"]["promoted"], result["promotion"]["reason"]
    assert result["promotion"]["evidence"].startswith("audit, ")
    assert result["promotion"]["p_value"] < 0.05 and result["promotion"]["ci_low"] > 0


def test_checkout_of_a_feedback_run_restores_its_masks(oracle_round):
    project, result = oracle_round
    masks = project / "data" / "feedback" / "round-1" / "masks"
    before = {p.name: p.read_bytes() for p in masks.iterdir()}
    shutil.rmtree(project / "data" / "feedback")  # as after switching branches
    (project / "data" / "feedback.dvc").write_text("outs: []\n")
    checkout_run_data(project, result["feedback"]["run_id"])
    assert {p.name: p.read_bytes() for p in masks.iterdir()} == before
    with pytest.raises(ValueError, match="logged no dvc.lock"):
        checkout_run_data(project, result["parent_run_id"])


def test_tasks_carry_the_query_model_run_as_model_version(oracle_round, team_server):
    _, result = oracle_round
    client = ls.connect()
    project_id = ls.pushed_rounds(client, "xbl-loop-oracle").project_id
    tasks = list(client.sdk.tasks.list(project=project_id, fields="all"))
    assert len(tasks) == 25
    versions = {
        p.model_version if hasattr(p, "model_version") else p["model_version"]
        for t in tasks
        for p in (t.predictions or [])
    }
    assert versions == {result["query_model"]["run_id"]} == {result["baseline"]["run_id"]}


def test_the_round_report_shows_the_models_side_by_side_and_can_be_drawn_again(oracle_round):
    from flows.report import report_flow

    project, result = oracle_round
    page = project / "data" / "rounds" / "round-1" / "report.html"
    assert result["report"] == str(page)
    text = page.read_text()
    assert html.escape(result["promotion"]["reason"]) in text
    assert "25 answers" in text  # the budget so far
    for grid in ("queries.png", "probes.png"):
        assert f"src='{grid}'" in text
        with Image.open(page.parent / grid) as png:
            assert png.size[0] > 300  # image, baseline = champion, candidate: three columns
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    logged = {a.path for a in client.list_artifacts(result["feedback"]["run_id"], "report")}
    assert logged == {
        f"report/{name}" for name in ("report.html", "report.png", "queries.png", "probes.png")
    }
    with Image.open(page.parent / "report.png") as png:  # the page as a picture, beside it
        assert png.size[0] == 1100 and png.size[1] > 900

    page.unlink()
    again = report_flow(result["feedback"]["run_id"], str(project))
    assert again == str(page) and html.escape(result["promotion"]["reason"]) in page.read_text()


@pytest.fixture(scope="module")
def second_round(oracle_round, labelstudio):
    project, first = oracle_round
    mp = pytest.MonkeyPatch()
    mp.setenv("LABEL_STUDIO_URL", labelstudio.url)
    mp.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    try:
        yield project, first, feedback_round_flow(str(project))
    finally:
        mp.undo()


def test_round_two_queries_with_the_champion_and_keeps_the_baseline(second_round):
    project, first, second = second_round
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    parent = client.get_run(second["parent_run_id"])
    champion = first["feedback"]["run_id"]  # promoted in round 1 (the test above)
    assert parent.data.tags[tracking.QUERY_MODEL_TAG] == champion
    assert second["query_model"]["run_id"] == champion
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert [r.info.run_name for r in children] == ["feedback-round-2"]  # no second baseline
    assert second["baseline"]["run_id"] == first["baseline"]["run_id"]
    run = client.get_run(second["feedback"]["run_id"])
    assert run.data.tags[tracking.FEEDBACK_ROUNDS_TAG] == "1,2"
    assert run.data.tags[tracking.COMPARED_WITH_TAG] == champion
    roles = {row["role"]: row["model"] for row in second["table"]}
    assert roles == {
        "baseline": "baseline",
        "champion": "feedback-round-1",
        "candidate": "feedback-round-2",
    }


def test_the_champion_is_the_best_audit_model_so_far(second_round):
    project, first, second = second_round
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    champion = client.get_model_version_by_alias("xbl-classifier", "champion").run_id
    audit = {
        r["run_id"]: r["metrics"]["audit_accuracy"]
        for r in (first["baseline"], first["feedback"], second["feedback"])
    }
    assert audit[champion] == max(audit.values())
    assert second["promotion"]["promoted"] == (champion == second["feedback"]["run_id"])


def test_unanswered_round_stops_clearly_and_a_rerun_picks_it_up(tmp_path, team_server):
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "loop-human"},
        train={"epochs": 6},
        query={"k": 6},
        labelstudio={"annotator": "human"},
        wait={"timeout_s": 4, "poll_s": 1, "min_annotated": 3},
    )
    with pytest.raises(RoundIncomplete, match="only 0 of 6 tasks annotated"):
        feedback_round_flow(str(project))
    assert not (project / "data" / "feedback").exists()
    # a person (here the simulated one, through the API) answers while no process waits
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "annotate", "--oracle"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "oracle annotated 6 task(s) of round 1" in done.stdout
    result = feedback_round_flow(str(project))
    assert result["round"] == 1
    manifest = (project / "data" / "feedback" / "round-1" / "manifest.csv").read_text()
    assert len(manifest.strip().splitlines()) == 1 + 6
    client = ls.connect()
    tasks = list(
        client.sdk.tasks.list(project=ls.pushed_rounds(client, "xbl-loop-human").project_id)
    )
    assert len(tasks) == 6  # the rerun pushed no duplicates


def test_a_wiped_tracking_store_opens_a_new_round_and_keeps_the_annotations(
    tmp_path, team_server, monkeypatch
):
    """After `make clean` the MLflow store is empty but Label Studio still holds round 1: the
    next run cannot resume it (its baseline run is gone), so it opens round 2 and learns from
    both rounds' annotations."""
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "loop-wiped"},
        train={"epochs": 3, "patience": 0},
        feedback={"epochs": 2},
        query={"k": 5},
    )
    first = feedback_round_flow(str(project))
    assert (first["round"], first["status"]) == (1, "done")
    # an empty store, as `make clean` leaves (a new file: this process still holds the old one)
    empty = f"sqlite:///{tmp_path / 'wiped.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty)

    second = feedback_round_flow(str(project))

    assert (second["round"], second["status"]) == (2, "done")
    run = MlflowClient(empty, empty).get_run(second["feedback"]["run_id"])
    assert run.data.tags[tracking.FEEDBACK_ROUNDS_TAG] == "1,2"
    manifest = project / "data" / "feedback" / "round-1" / "manifest.csv"
    assert len(manifest.read_text().strip().splitlines()) == 1 + 5
    rounds = project / "data" / "rounds"
    asked = [
        {q["image_id"] for q in json.loads((rounds / f"round-{n}" / "queries.json").read_text())}
        for n in (1, 2)
    ]
    assert len(asked[1]) == 5 and not asked[0] & asked[1]  # never asked twice
    # round 1 is adopted: the next run finds nothing orphaned and learns from its masks on disk
    state = read_round_state.fn(str(project), "loop-wiped", "xbl-loop-wiped")
    assert (state.number, state.completed, state.orphaned) == (3, (1, 2), ())
    client = ls.connect()
    tasks = list(
        client.sdk.tasks.list(project=ls.pushed_rounds(client, "xbl-loop-wiped").project_id)
    )
    assert len(tasks) == 10  # round 1's tasks and answers stay in Label Studio
