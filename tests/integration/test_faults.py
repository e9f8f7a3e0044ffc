"""A crash at any step of a round: the next run carries on, and the end state is the same as
an uninterrupted run's (tasks, annotations, masks, registered models, metrics)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from services import labelstudio as ls
from services import tracking
from tests.integration.project import REPO, make_project

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

SETTINGS = dict(train={"epochs": 6}, query={"k": 10})


def run_round(project: Path, env: dict, crash_after: str | None = None) -> tuple[int, str]:
    """Run `xbl round` in its own process group; after it ends, whatever it left behind (its
    temporary Prefect server, when it was killed) goes too, as after a power cut."""
    env = {**env, "XBL_CRASH_AFTER": crash_after or ""}
    log = project.parent / f"{project.name}-{crash_after or 'complete'}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "round"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        code = proc.wait(600)
    with contextlib.suppress(ProcessLookupError):  # a stray Prefect server must not outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text()


def end_state(project: Path, experiment: str) -> dict:
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    lsc = ls.connect()
    project_id = ls.pushed_rounds(lsc, f"xbl-{experiment}").project_id
    tasks = list(lsc.sdk.tasks.list(project=project_id, fields="all"))
    versions = client.search_model_versions("name = 'xbl-classifier'")
    feedback = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        "attributes.run_name = 'feedback-round-1' and attributes.status = 'FINISHED'",
    )
    masks = project / "data" / "feedback" / "round-1"
    return {
        "tasks": sorted(t.data["image_id"] for t in tasks),
        "annotations_per_task": sorted(len(t.annotations or []) for t in tasks),
        "masks": {p.name: p.read_bytes() for p in sorted((masks / "masks").iterdir())},
        "manifest": (masks / "manifest.csv").read_text(),
        "registered": sorted(client.get_run(v.run_id).info.run_name for v in versions),
        "feedback_runs": len(feedback),
        "test_accuracy": round(feedback[0].data.metrics["test_accuracy"], 6),
    }


@pytest.fixture
def env(labelstudio):
    return {
        **os.environ,
        "LABEL_STUDIO_URL": labelstudio.url,
        "LABEL_STUDIO_API_KEY": labelstudio.token,
    }


def test_crashes_after_baseline_push_wait_and_retraining_lose_nothing(tmp_path, env, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", env["LABEL_STUDIO_URL"])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", env["LABEL_STUDIO_API_KEY"])
    reference = make_project(
        tmp_path / "reference", mlflow={"experiment": "faults-ref"}, **SETTINGS
    )
    code, output = run_round(reference, env)
    assert code == 0, output[-3000:]

    crashed = make_project(tmp_path / "crashed", mlflow={"experiment": "faults-crash"}, **SETTINGS)
    for step in ("baseline", "push", "wait", "retrain"):
        code, output = run_round(crashed, env, crash_after=step)
        assert code == -signal.SIGKILL, f"no crash after {step}: {output[-2000:]}"
    code, output = run_round(crashed, env)
    assert code == 0, output[-3000:]
    assert "discarded 1 unfinished retraining run" in output
    baseline_crash = (tmp_path / "crashed-push.log").read_text()  # the run after it
    assert "discarded 1 attempt(s) that died before the push" in baseline_crash

    assert end_state(crashed, "faults-crash") == end_state(reference, "faults-ref")
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert env["LABEL_STUDIO_API_KEY"] not in logs
