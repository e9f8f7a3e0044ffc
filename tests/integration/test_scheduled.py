"""Scheduled operation: a served deployment completes a round across two runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient
from prefect.deployments.steps.core import run_steps
from prefect.utilities.templating import apply_values

from services import labelstudio as ls
from services import tracking
from tests.integration.ls_server import free_port
from tests.integration.project import REPO, make_project

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]


def test_prefect_yaml_takes_the_rounds_cron_from_the_projects_params(tmp_path, monkeypatch):
    """The cron is written once, in params.yaml: prefect.yaml's build step reads it where
    `prefect deploy` runs, and the deployment's schedule is the step's answer."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    scheduled = {d["name"]: d for d in spec["deployments"]}["scheduled"]
    monkeypatch.chdir(make_project(tmp_path / "project", schedule={"cron": "7 5 * * *"}))
    outputs = asyncio.run(run_steps(scheduled["build"]))
    assert apply_values(scheduled["schedules"], outputs) == [{"cron": "7 5 * * *"}]
    assert scheduled["parameters"]["wait_mode"] == "resume"
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        assert f"def {func}(" in (REPO / path).read_text()


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(
        tmp_path / "project",
        mlflow={"experiment": "scheduled"},
        train={"epochs": 5},
        query={"k": 8},
        labelstudio={"annotator": "human"},
        schedule={"interval_s": 8},
    )


@pytest.fixture
def servers(tmp_path, project):
    """`xbl server start`: a real Prefect server and MLflow tracking server on loopback,
    MLflow serving the project's store. Yields (Prefect API URL, MLflow URL)."""
    ports = {"XBL_PREFECT_PORT": str(free_port()), "XBL_MLFLOW_PORT": str(free_port())}
    env = {
        **os.environ,
        **ports,
        "XBL_SERVICES_HOME": str(tmp_path / "services"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    env.pop("PREFECT_API_URL", None)
    cli = [sys.executable, "-m", "flows.cli", "--project", str(project), "server"]
    try:
        started = subprocess.run(
            [*cli, "start"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert started.returncode == 0, started.stdout + started.stderr
        status = subprocess.run(
            [*cli, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and status.stdout.count("running at") == 2, status.stdout
        yield (
            f"http://127.0.0.1:{ports['XBL_PREFECT_PORT']}/api",
            f"http://127.0.0.1:{ports['XBL_MLFLOW_PORT']}",
        )
    finally:
        subprocess.run([*cli, "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)


def wait_until(check, timeout: float, what: str, serve: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"xbl serve exited ({serve.returncode}) while waiting for {what}")
        if check():
            return
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}")


def test_served_deployment_completes_a_round_across_two_runs(
    tmp_path, project, servers, labelstudio
):
    prefect_server, mlflow_server = servers
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "LABEL_STUDIO_URL": labelstudio.url,
        "LABEL_STUDIO_API_KEY": labelstudio.token,
        "PREFECT_HOME": str(tmp_path / "client"),
    }
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    title = "xbl-scheduled"
    client = MlflowClient(mlflow_server, mlflow_server)  # read back through the tracking server
    try:

        def pushed():
            os.environ.update(
                LABEL_STUDIO_URL=labelstudio.url, LABEL_STUDIO_API_KEY=labelstudio.token
            )
            return 1 in ls.pushed_rounds(ls.connect(), title).rounds

        wait_until(pushed, 240, "the first run to push round 1", serve)
        time.sleep(10)  # later runs find the round open and end: nothing annotated yet
        exp = client.get_experiment_by_name("scheduled")
        assert tracking.completed_rounds(client, exp.experiment_id) == set()
        answered = subprocess.run(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "annotate", "--oracle"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert "oracle annotated 8 task(s) of round 1" in answered.stdout, answered.stderr
        # done: promoted in MLflow, and the run got as far as publishing its comparison table
        wait_until(
            lambda: (
                tracking.completed_rounds(client, exp.experiment_id) == {1}
                and _artifacts(prefect_server)
            ),
            300,
            "a later run to retrain round 1",
            serve,
        )
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
        log.close()
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'feedback-round-1'")
    assert len(runs) == 1
    tasks = list(
        ls.connect().sdk.tasks.list(project=ls.pushed_rounds(ls.connect(), title).project_id)
    )
    assert len(tasks) == 8  # no run pushed a duplicate
    log_text = (tmp_path / "serve.log").read_text()
    assert labelstudio.token not in log_text
    assert labelstudio.token not in prefect_records(prefect_server)
    served = requests.post(f"{prefect_server}/deployments/filter", json={}, timeout=10).json()
    assert {d["name"] for d in served} == {"scheduled", "baseline"}  # as in prefect.yaml
    assert (project / "mlflow.db").is_file()  # the server wrote the project's store
    assert labelstudio.token not in mlflow_records(client, exp.experiment_id)


def _artifacts(api: str) -> list:
    return requests.post(f"{api}/artifacts/filter", json={"limit": 10}, timeout=10).json()


def prefect_records(api: str) -> str:
    """Everything the Prefect server keeps of the runs: artifacts, run parameters, logs."""
    records = {
        kind: requests.post(f"{api}/{kind}/filter", json={"limit": 200}, timeout=10).json()
        for kind in ("artifacts", "flow_runs", "task_runs", "logs")
    }
    assert all(records.values()), {k: len(v) for k, v in records.items()}  # real records to grep
    assert any("wait_mode" in run["parameters"] for run in records["flow_runs"])
    return json.dumps(records)


def mlflow_records(client: MlflowClient, experiment_id: str) -> str:
    runs = client.search_runs([experiment_id])
    assert runs
    return repr([(r.data.params, r.data.tags) for r in runs])
