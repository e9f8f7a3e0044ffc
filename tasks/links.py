"""Link artifacts on a flow run's page: the Label Studio project and the MLflow runs it made."""

from __future__ import annotations

import os
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact

from services import tracking
from tasks import SERVICE_RETRIES

# where `xbl server start` serves the MLflow UI for a project whose store is a local file
LOCAL_MLFLOW_UI = "http://127.0.0.1:{port}"


def artifact_key(experiment: str, what: str) -> str:
    """A key Prefect accepts (lowercase letters, digits, dashes), one per experiment and
    link: the Artifacts page then shows each link's latest version for that experiment."""
    slug = re.sub(r"[^a-z0-9]+", "-", experiment.lower()).strip("-") or "xbl"
    return f"xbl-{slug}-{what}"


def mlflow_run_link(uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """(the run's page in the MLflow UI, a description): a tracking server serves its own UI;
    a local store's UI is `xbl server start`'s, which need not be running yet."""
    if uri.startswith(("http://", "https://")):
        base, where = uri.rstrip("/"), f"on the tracking server {uri}"
    else:
        base = LOCAL_MLFLOW_UI.format(port=os.environ.get("XBL_MLFLOW_PORT", "5000"))
        where = f"in {uri}; the link opens once `xbl server start` serves the MLflow UI"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}", f"MLflow run {run_id} {where}"


@task
def link_labelstudio(url: str, round_number: int, experiment: str) -> str:
    """The Label Studio project where the round's tasks wait for annotators."""
    create_link_artifact(
        link=url,
        link_text=f"Label Studio: the tasks of round {round_number}",
        key=artifact_key(experiment, "labelstudio"),
        description=f"Round {round_number}'s queries, to annotate in Label Studio",
    )
    return url


@task(**SERVICE_RETRIES)
def link_mlflow_runs(project: str, experiment: str, runs: dict[str, str]) -> dict[str, str]:
    """One link per role ({"candidate": run id, ...}) to the run's MLflow page."""
    client = tracking.client_for(Path(project))
    links = {}
    for role, run_id in runs.items():
        exp_id = client.get_run(run_id).info.experiment_id
        links[role], description = mlflow_run_link(client.tracking_uri, exp_id, run_id)
        create_link_artifact(
            link=links[role],
            link_text=f"MLflow: {role} run",
            key=artifact_key(experiment, f"mlflow-{role}"),
            description=description,
        )
    return links
