"""A variant launched as a flow run: its settings reach MLflow's params, and the run's page in
Prefect links to the Label Studio project and the MLflow runs it made."""

from __future__ import annotations

import re
from uuid import UUID

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.baseline import baseline_flow
from flows.loop import feedback_round_flow
from services import tracking
from tests.integration.project import TINY_TRAIN, make_project
from xbl.errors import ConfigError

pytestmark = pytest.mark.integration


def links_of(flow_run_id: UUID) -> dict[str, str]:
    """The run's link artifacts: {key: link} (Prefect keeps a link as markdown, `[text](link)`)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    links = {a.key: re.fullmatch(r"\[.*\]\((.*)\)", str(a.data)) for a in found if a.key}
    return {key: match.group(1) for key, match in links.items() if match}


def test_a_baseline_variant_records_its_settings_and_links_its_run(tiny_project):
    state = baseline_flow(str(tiny_project), train_epochs=2, train_lr=0.003, return_state=True)
    result = state.result()
    run_id = result["baseline"]["run_id"]
    run = MlflowClient(tracking.tracking_uri(tiny_project)).get_run(run_id)
    assert (run.data.params["epochs"], run.data.params["lr"]) == ("2", "0.003")
    assert run.data.params["batch_size"] == str(TINY_TRAIN["batch_size"])  # the file's
    links = links_of(state.state_details.flow_run_id)
    link = links["xbl-xbl-mlflow-baseline"]
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run_id}" in link


def test_a_bad_override_fails_the_run_with_the_files_message(tiny_project):
    with pytest.raises(ConfigError, match=r"^train.model is 'resnet9'; allowed: small_cnn"):
        baseline_flow(str(tiny_project), train_model="resnet9")
    assert not (tiny_project / "data" / "prepared").exists()  # refused before any step ran


@pytest.mark.labelstudio
def test_a_round_variant_records_its_settings_and_links_label_studio_and_mlflow(
    tmp_path, labelstudio, monkeypatch
):
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    project = make_project(
        tmp_path / "project",
        mlflow={"experiment": "variant"},
        train={"epochs": 3, "patience": 0},
        feedback={"epochs": 2, "method": "rrr_output"},
    )
    state = feedback_round_flow(
        str(project),
        feedback_method="rrr",
        feedback_lambda=7.5,
        query_strategy="margin",
        query_k=4,
        return_state=True,
    )
    result = state.result()
    assert result["status"] == "done"
    client = MlflowClient(tracking.tracking_uri(project))
    params = client.get_run(result["feedback"]["run_id"]).data.params
    assert params["feedback.method"] == "rrr"
    assert params["feedback.lambda"] == "7.5"
    assert (params["query.strategy"], params["query.k"]) == ("margin", "4")
    links = links_of(state.state_details.flow_run_id)
    assert links["xbl-variant-labelstudio"] == result["labelstudio_url"]
    roles = {
        "round": result["parent_run_id"],
        "candidate": result["feedback"]["run_id"],
        "champion": result["promotion"]["champion"]["run_id"],
        "baseline": result["baseline"]["run_id"],
    }
    for role, run_id in roles.items():
        assert links[f"xbl-variant-mlflow-{role}"].endswith(f"/runs/{run_id}"), role
