"""One round per project at a time: two `xbl round` started together, and a third from another
checkout of the same experiment (a teammate's worker). One runs; the others are refused at once,
naming it; it finishes as if alone. And the cleanup of a dead attempt never touches a live one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings
from prefect.variables import Variable

from flows.loop import TEAM_LEASE_S, round_lock, team_limit_name
from services import labelstudio as ls
from services import lock, tracking
from tests.integration.project import REPO, TINY_TRAIN, make_project
from xbl.errors import ProjectBusy

EXPERIMENT = "concurrent-rounds"
K = 5
SETTINGS = dict(
    mlflow={"experiment": EXPERIMENT},
    train=TINY_TRAIN,
    feedback={"epochs": 2},
    query={"k": K},
    # a person answers, so the round that runs waits for the test to answer: the refusals are
    # tried while it is surely running
    labelstudio={"annotator": "human"},
    wait={"mode": "block", "poll_s": 1, "timeout_s": 600, "min_annotated": K},
)


def start_round(project: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "round"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture
def env(labelstudio, monkeypatch):
    """Label Studio and the session's Prefect server, as a team's workers share them: the
    rounds run in team mode, so the experiment's team-wide slot is taken too."""
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    return {
        **os.environ,
        "LABEL_STUDIO_URL": labelstudio.url,
        "LABEL_STUDIO_API_KEY": labelstudio.token,
        "PREFECT_API_URL": get_current_settings().api.url,
    }


@pytest.mark.labelstudio
def test_two_rounds_at_once_one_runs_and_the_others_are_refused_naming_it(tmp_path, env):
    project = make_project(tmp_path / "project", **SETTINGS)
    both = {
        name: start_round(project, env, tmp_path / f"{name}.log") for name in ("first", "second")
    }
    began = time.monotonic()
    wait_for(lambda: any(p.poll() is not None for p in both.values()), "neither run ended")
    refused_after = time.monotonic() - began
    loser = next(name for name, p in both.items() if p.poll() is not None)
    winner = next(name for name in both if name != loser)
    runner = both[winner]
    try:
        refusal = (tmp_path / f"{loser}.log").read_text()
        assert both[loser].returncode == 2, refusal[-3000:]
        assert runner.poll() is None, "the round that runs must not have been stopped"
        assert refused_after < 120  # its start-up only: it never waited for the other
        busy = [line for line in refusal.splitlines() if line.startswith("xbl: ")]
        assert len(busy) == 1 and "is busy" in busy[0], refusal[-3000:]
        holder = lock.Holder.from_json((project / lock.LOCK_FILE).read_text())
        assert holder.pid == runner.pid
        for named in (f"pid {runner.pid}", f"host {lock.this_host()}", holder.flow_run):
            assert named in busy[0]
        assert "Task run" not in refusal  # refused before its first step

        # a teammate's worker: another checkout (another lock file), the same experiment
        wait_for(lambda: _pushed(EXPERIMENT) == K, "the round's tasks were not pushed")
        other = make_project(tmp_path / "teammate", **SETTINGS)
        teammate = start_round(other, env, tmp_path / "teammate.log")
        assert teammate.wait(300) == 2
        refusal = (tmp_path / "teammate.log").read_text()
        busy = [line for line in refusal.splitlines() if line.startswith("xbl: ")]
        assert len(busy) == 1 and "team-wide round slot" in busy[0], refusal[-3000:]
        assert team_limit_name(EXPERIMENT) in busy[0] and f"pid {runner.pid}" in busy[0]

        answered = subprocess.run(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "annotate", "--oracle"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert answered.returncode == 0, answered.stderr[-3000:]
        assert runner.wait(600) == 0, (tmp_path / f"{winner}.log").read_text()[-3000:]
    finally:
        for proc in (*both.values(), locals().get("teammate")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    _assert_round_ran_alone(project, (tmp_path / f"{winner}.log").read_text())


def _pushed(experiment: str) -> int:
    client = ls.connect()
    project_id = ls.pushed_rounds(client, f"xbl-{experiment}").project_id
    return len(list(client.sdk.tasks.list(project=project_id))) if project_id else 0


def _assert_round_ran_alone(project: Path, log: str) -> None:
    """Untouched: one attempt, nothing discarded, each task once with one answer, the lock and
    the team-wide slot free again."""
    assert "discarded" not in log
    uri = tracking.tracking_uri(project)
    client = MlflowClient(uri, uri)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("round")) == [
        "round-1"
    ]
    assert {r.info.status for r in runs} == {"FINISHED"}
    versions = client.search_model_versions("name = 'xbl-classifier'")
    named = sorted(client.get_run(v.run_id).info.run_name for v in versions)
    assert named == ["baseline", "feedback-round-1"]
    lsc = ls.connect()
    tasks = list(
        lsc.sdk.tasks.list(
            project=ls.pushed_rounds(lsc, f"xbl-{EXPERIMENT}").project_id, fields="all"
        )
    )
    assert [len(t.annotations or []) for t in tasks] == [1] * K
    assert (project / lock.LOCK_FILE).read_text() == ""
    name = team_limit_name(EXPERIMENT)
    assert Variable.get(name) is None
    with get_client(sync_client=True) as prefect:
        assert prefect.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_cleaning_up_a_dead_attempt_never_touches_a_live_one(tmp_path):
    """Three attempts at round 1 left RUNNING in MLflow: one whose run is alive (another
    checkout's, on this host), one whose process died, one from before holders were recorded.
    Only the two dead ones are failed and their models unregistered."""
    project = tmp_path / "project"
    project.mkdir()
    uri = tracking.tracking_uri(project)
    client = tracking.client_for(project)
    exp_id = tracking.experiment_id(client, project, "discard")
    client.create_registered_model("xbl-classifier")
    alive = _holding(tmp_path / "alive")
    dead = _holding(tmp_path / "dead")
    records = {"alive": _recorded(tmp_path / "alive"), "dead": _recorded(tmp_path / "dead")}
    dead.stdin.close()
    dead.wait()
    try:
        parents = {
            name: _attempt(client, exp_id, records.get(name))
            for name in ("alive", "dead", "unrecorded")
        }
        with lock.project_lock(project):  # as the flow that cleans up holds it
            discarded = tracking.discard_unpushed_round(client, exp_id, "xbl-classifier", 1)
    finally:
        alive.kill()
        alive.wait()
    assert discarded == 2
    store = MlflowClient(uri, uri)
    status = {name: store.get_run(run_id).info.status for name, run_id in parents.items()}
    assert status == {"alive": "RUNNING", "dead": "FAILED", "unrecorded": "FAILED"}
    left = store.search_model_versions("name = 'xbl-classifier'")
    assert [v.run_id for v in left] == [_child(store, exp_id, parents["alive"])]


HOLD = """
import sys
from services import lock
with lock.project_lock(sys.argv[1], "flow-run-id", "a-live-round"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holding(project: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(project)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _recorded(project: Path) -> lock.Holder:
    return lock.Holder.from_json((project / lock.LOCK_FILE).read_text())


def _attempt(client, exp_id: str, holder: lock.Holder | None) -> str:
    """A round-1 parent run left RUNNING with a baseline child and its registered model."""
    tags = {tracking.HOLDER_TAG: holder.to_json()} if holder else {}
    parent = tracking.start_run(client, exp_id, "round-1", tags=tags)
    child = tracking.start_run(client, exp_id, "baseline", parent_id=parent)
    source = client.get_run(child).info.artifact_uri + "/model"
    client.create_model_version("xbl-classifier", source, run_id=child)
    return parent


def _child(client, exp_id: str, parent: str) -> str:
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return runs[0].info.run_id


HOLD_TEAM = """
import sys
from pathlib import Path
from prefect import flow
from flows.loop import round_lock

@flow
def hold(project: str, experiment: str) -> None:
    with round_lock(Path(project), experiment):
        print("held", flush=True)
        sys.stdin.read()

hold(sys.argv[1], sys.argv[2])
"""


@flow
def take_round_lock(project: str, experiment: str) -> str:
    with round_lock(Path(project), experiment) as holder:
        return holder.flow_run


def test_the_team_wide_slot_refuses_another_checkout_and_frees_itself_when_its_holder_dies(
    tmp_path,
):
    """Two checkouts of one experiment have two lock files: the team-wide slot stops the
    second. Once the holder's process is killed, the next run takes the slot at once instead of
    waiting out its lease."""
    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_TEAM, str(tmp_path / "theirs"), "team-slot"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: holder.stdout.readline().strip() == "held", "no holder", timeout=120)
        with pytest.raises(ProjectBusy, match="team-wide round slot") as refused:
            take_round_lock(str(tmp_path / "ours"), "team-slot")
        assert f"pid {holder.pid} on host {lock.this_host()}" in str(refused.value)
        assert Variable.get(team_limit_name("team-slot"))["lease"]  # what a dead holder frees
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    began = time.monotonic()
    assert take_round_lock(str(tmp_path / "ours"), "team-slot")
    assert time.monotonic() - began < TEAM_LEASE_S / 2  # freed, not expired
    assert Variable.get(team_limit_name("team-slot")) is None
