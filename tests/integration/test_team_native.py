"""The team topology of infra/compose.yaml, started natively (infra/team.py): one full round
run by the Prefect worker from prefect.yaml's deployment, against PostgreSQL-backed MLflow
(artifacts in S3), Label Studio on PostgreSQL and an S3 DVC remote (moto standing in for
MinIO). Every assertion reads the stores themselves: PostgreSQL rows, bucket objects, tasks."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from infra import team as native
from services import labelstudio as ls
from services import tracking
from tests.integration.project import REPO, as_worker_project, make_project

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

EXPERIMENT = "team"
TITLE = f"xbl-{EXPERIMENT}"  # xbl.config.project_title
K = 5
CRON = "7 5 * * *"  # not the default: the deployment's cron must come from the project's params


@pytest.fixture(scope="session")
def team_project(tmp_path_factory) -> Path:
    """A clone of the pipeline as a worker's project: code, params, and prefect.yaml with its
    schedule paused (a scheduled run must not race the test's run)."""
    project = make_project(
        tmp_path_factory.mktemp("team") / "project",
        # 16x16 images (the digits at their native 8x8): evaluation and feedback training
        # cost a third of the default 28x28's
        data={"image_size": 16, "digit_size": 8, "decoy_size": 4},
        mlflow={"experiment": EXPERIMENT},
        train={"epochs": 3, "patience": 0, "batch_size": 64},
        feedback={"epochs": 2},
        query={"k": K},
        schedule={"cron": CRON},
    )
    return as_worker_project(project)


@pytest.fixture(scope="session")
def team(tmp_path_factory, team_project):
    """The running topology (infra.team.Team); stopped and deleted at the end."""
    reason = native.available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("team-home")
    running = native.up(home, team_project, log=lambda _: None)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def as_client(team, monkeypatch):
    """This process as a client of the team (MLflow, S3, Label Studio), as `client.env` says."""
    for key, value in team.client_env().items():
        monkeypatch.setenv(key, value)
    return team


def test_xbl_team_status_reads_the_running_topology(team):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", team.project, "team", "status"]
        + ["--home", str(team.home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6 and all(" running " in line for line in lines), done.stdout
    assert oct((team.home / native.SECRETS_FILE).stat().st_mode & 0o777) == "0o600"
    secrets = team.secret_values()
    assert len(secrets) == 8  # superuser, 3 databases, S3, LS admin and token, Prefect auth
    command_lines = _command_lines()
    for value in secrets:  # no secret in the output, nor on any command line (`ps`)
        assert value not in done.stdout
        assert value not in command_lines, "a secret is visible in `ps`"


def test_a_round_run_by_the_worker_lands_in_every_store(team, team_project, as_client):
    project = team_project
    team.use_dvc_remote(project)
    deployed = team.deploy(project)
    assert "xbl-feedback-round/scheduled" in deployed

    # --- the round, started as a deployment run and executed by the process worker --------
    deployment = team.prefect_api("GET", "/deployments/name/xbl-feedback-round/scheduled")
    assert deployment["work_pool_name"] == native.POOL
    run = team.prefect_api("POST", f"/deployments/{deployment['id']}/create_flow_run", {})
    final = _wait_for_flow_run(team, run["id"], timeout=420)
    assert final["state"]["type"] == "COMPLETED", (
        final["state"],
        team.log_tail("worker", 60),
    )
    assert final["infrastructure_pid"], "not run by a worker"
    # ... recorded in the Prefect server's PostgreSQL database
    rows = team.psql(f"SELECT state_type FROM flow_run WHERE id = '{run['id']}'", "prefect")
    assert rows.split() == ["COMPLETED"]

    # --- MLflow: runs and models in PostgreSQL, artifacts in the S3 bucket ----------------
    client = MlflowClient(team.url("mlflow"), team.url("mlflow"))
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert tracking.completed_rounds(client, exp.experiment_id) == {1}
    feedback = client.search_runs([exp.experiment_id], "attributes.run_name = 'feedback-round-1'")
    assert len(feedback) == 1 and feedback[0].info.status == "FINISHED"
    db = team.database("mlflow")
    names = team.psql(f"SELECT name FROM runs WHERE experiment_id = {exp.experiment_id}", db)
    assert {"baseline", "round-1", "feedback-round-1"} <= set(names.split())
    versions = team.psql("SELECT count(*) FROM model_versions WHERE name = 'xbl-classifier'", db)
    assert int(versions) >= 2  # the baseline and the round's candidate
    s3 = team.s3()
    model_files = _keys(s3, "mlflow")
    assert any(key.endswith("/MLmodel") for key in model_files), model_files[:20]
    assert any(key.endswith("/dvc.lock") for key in model_files)

    # --- Label Studio on PostgreSQL: the round's tasks, answered by the oracle ------------
    labelstudio = ls.connect()
    pushed = ls.pushed_rounds(labelstudio, TITLE)
    assert set(pushed.rounds) == {1}
    tasks = list(labelstudio.sdk.tasks.list(project=pushed.project_id))
    assert len(tasks) == K
    ls_db = team.database("labelstudio")
    counts = team.psql(
        f"SELECT (SELECT count(*) FROM task WHERE project_id = {pushed.project_id}), "
        f"(SELECT count(*) FROM task_completion c JOIN task t ON c.task_id = t.id "
        f"WHERE t.project_id = {pushed.project_id})",
        ls_db,
    )
    assert counts.strip() == f"{K}|{K}"

    # --- DVC: pushed to the S3 remote, and pulled back from it into an empty cache ---------
    dvc_keys = _keys(s3, "dvc")
    assert dvc_keys and all(key.startswith("files/md5/") for key in dvc_keys)
    dataset = project / "data" / "prepared" / "images.npy"
    digest = hashlib.md5(dataset.read_bytes()).hexdigest()
    assert any(key.endswith(digest[2:]) for key in dvc_keys)
    masks = sorted((project / "data" / "feedback" / "round-1" / "masks").glob("*.png"))
    assert len(masks) == K
    for gone in (project / ".dvc" / "cache", project / "data" / "prepared"):
        shutil.rmtree(gone)
    shutil.rmtree(project / "data" / "feedback")
    from services.checkout import checkout_run_data

    checkout_run_data(project, feedback[0].info.run_id)
    assert hashlib.md5(dataset.read_bytes()).hexdigest() == digest
    assert sorted((project / "data" / "feedback" / "round-1" / "masks").glob("*.png")) == masks

    # --- nothing secret in what the services logged --------------------------------------
    logs = "".join(p.read_text(errors="replace") for p in (team.home / "logs").glob("*.log"))
    for key in ("LABEL_STUDIO_API_TOKEN", "MINIO_ROOT_PASSWORD", "MLFLOW_DB_PASSWORD"):
        assert team.secrets[key] not in logs


def test_the_deployment_runs_on_the_cron_of_the_projects_params(team):
    """prefect.yaml writes no cron: its build step read the project's params.yaml when the
    round test deployed (as_worker_project paused the schedule)."""
    deployment = team.prefect_api("GET", "/deployments/name/xbl-feedback-round/scheduled")
    [schedule] = deployment["schedules"]
    assert schedule["schedule"]["cron"] == CRON
    assert schedule["active"] is False


def test_down_stops_everything_and_deletes_the_cluster(tmp_path_factory, team):
    """Last in the file: the session fixture's stop() then finds nothing left to do."""
    pids = dict(team.pids)
    pg_dir = Path(team.pg_dir)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", team.project, "team", "down"]
        + ["--home", str(team.home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [name for name, pid in pids.items() if native._alive(pid)]
    assert not pg_dir.exists()
    assert not (team.home / native.SECRETS_FILE).exists()
    for port in team.ports.values():
        assert not native._http_ok(f"http://127.0.0.1:{port}/", timeout=1)


def _wait_for_flow_run(team, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = team.prefect_api("GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {run['state']['type']}:\n{team.log_tail('worker', 60)}")
        time.sleep(2)


def _keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _command_lines() -> str:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(found)
