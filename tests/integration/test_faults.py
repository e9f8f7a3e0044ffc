"""A crash at any step of a round, or in the middle of one: the next run carries on, and the
end state is the same as an uninterrupted run's (tasks, annotations, masks, registered models,
the champion, metrics, the promotion decision).

The drills between steps run in `make test`; the mid-step drills (services/faults.py) take
about a minute each and run with XBL_FAULT_DRILLS=1 (`make test-fault-drills`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from services import dvc, tracking
from services import labelstudio as ls
from tests.integration.project import REPO, make_project

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

SETTINGS = dict(train={"epochs": 6}, query={"k": 10})
REGISTERED = "xbl-classifier"
FEEDBACK = Path("data") / "feedback"


def run_round(project: Path, env: dict, crash_after: str | None = None) -> tuple[int, str]:
    """Run `xbl round` in its own process group; after it ends, whatever it left behind (its
    temporary Prefect server, when it was killed) goes too, as after a power cut."""
    env = {**env, "XBL_CRASH_AFTER": crash_after or ""}
    log = project.parent / f"{project.name}-{(crash_after or 'complete').replace(':', '-')}.log"
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


def _mlflow(project: Path) -> MlflowClient:
    return MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))


def _runs(client: MlflowClient, experiment: str, name: str, status: str | None = None) -> list:
    where = f"attributes.run_name = '{name}'"
    if status:
        where += f" and attributes.status = '{status}'"
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], where)


def _run_name(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.run_name


def _champion(client: MlflowClient) -> str | None:
    version = tracking.alias_version(client, REGISTERED, tracking.CHAMPION)
    return version and _run_name(client, version.run_id)


def _decision(client: MlflowClient, run_id: str) -> dict | None:
    """The recorded decision, with the run it was compared with by name (ids differ)."""
    decision = tracking.recorded_decision(client, run_id)
    if decision is None:
        return None
    return {**decision, "compared_with": _run_name(client, decision["compared_with"])}


def feedback_in_remote(project: Path) -> bool:
    """Every file data/feedback.dvc names is in the DVC remote."""
    out = dvc.dvc(project, "status", "--cloud", "--json", f"{FEEDBACK}.dvc")
    return json.loads(out or "{}") == {}


def end_state(project: Path, experiment: str) -> dict:
    """Round 1 as the services and the project hold it, its report page included (a later
    round, opened by a rerun, is left out)."""
    client = _mlflow(project)
    lsc = ls.connect()
    project_id = ls.pushed_rounds(lsc, f"xbl-{experiment}").project_id
    tasks = [
        t
        for t in lsc.sdk.tasks.list(project=project_id, fields="all")
        if str(t.data.get("round")) == "1"
    ]
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    feedback = _runs(client, experiment, "feedback-round-1", "FINISHED")
    parents = [r for r in _runs(client, experiment, "round-1") if r.info.status != "FAILED"]
    masks = project / FEEDBACK / "round-1"
    pointer = yaml.safe_load((project / f"{FEEDBACK}.dvc").read_text())
    return {
        "tasks": sorted(t.data["image_id"] for t in tasks),
        "annotations_per_task": sorted(len(t.annotations or []) for t in tasks),
        "masks": {p.name: p.read_bytes() for p in sorted((masks / "masks").iterdir())},
        "manifest": (masks / "manifest.csv").read_text(),
        "feedback_folder": sorted(p.name for p in (project / FEEDBACK).iterdir()),
        "feedback_version": pointer["outs"][0]["md5"],
        "feedback_in_remote": feedback_in_remote(project),
        "registered": sorted(_run_name(client, v.run_id) for v in versions),
        "champion": _champion(client),
        "feedback_runs": len(feedback),
        "test_accuracy": round(feedback[0].data.metrics["test_accuracy"], 6),
        "decision": _decision(client, feedback[0].info.run_id),
        "done": feedback[0].data.tags.get(tracking.PROMOTION_TAG),
        "round_parents": sorted(r.info.status for r in parents),
        "round_files": sorted(p.name for p in (project / "data" / "rounds" / "round-1").iterdir()),
    }


@pytest.fixture(scope="module")
def env(labelstudio):
    with pytest.MonkeyPatch.context() as patch:  # end_state reads Label Studio from here too
        patch.setenv("LABEL_STUDIO_URL", labelstudio.url)
        patch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> dict:
    """One undisturbed round: the end state every drill must reach."""
    root = tmp_path_factory.mktemp("faults")
    project = make_project(root / "reference", mlflow={"experiment": "faults-ref"}, **SETTINGS)
    code, output = run_round(project, env)
    assert code == 0, output[-3000:]
    state = end_state(project, "faults-ref")
    assert state["feedback_in_remote"] and state["round_parents"] == ["FINISHED"]
    return state


# `make test` kills the round after the baseline and after the retraining, the two crashes
# whose leftovers the next run must clean up; the drills (XBL_FAULT_DRILLS=1) add the push and
# the wait
BETWEEN_STEPS = (
    ("baseline", "push", "wait", "retrain")
    if os.environ.get("XBL_FAULT_DRILLS") == "1"
    else ("baseline", "retrain")
)


def test_crashes_between_steps_lose_nothing(tmp_path, env, reference):
    crashed = make_project(tmp_path / "crashed", mlflow={"experiment": "faults-crash"}, **SETTINGS)
    for step in BETWEEN_STEPS:
        code, output = run_round(crashed, env, crash_after=step)
        assert code == -signal.SIGKILL, f"no crash after {step}: {output[-2000:]}"
    code, output = run_round(crashed, env)
    assert code == 0, output[-3000:]
    assert "discarded 1 unfinished retraining run" in output
    after_baseline = (tmp_path / f"crashed-{BETWEEN_STEPS[1]}.log").read_text()  # the next run
    assert "discarded 1 attempt(s) that died before the push" in after_baseline

    assert end_state(crashed, "faults-crash") == reference
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert env["LABEL_STUDIO_API_KEY"] not in logs


@pytest.mark.parametrize(("named", "arrivals"), [("drill:3", 3), ("drill-other", 5)])
def test_a_crash_point_kills_at_once_on_the_named_arrival(named, arrivals):
    """No service: `step:n` kills on the n-th arrival, with SIGKILL (nothing after it runs);
    another step's name kills nothing."""
    code = "from services.faults import crash_point\nfor i in range(5):\n"
    code += "    print(i, flush=True)\n    crash_point('drill')\nprint('after')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "XBL_CRASH_AFTER": named},
        capture_output=True,
        text=True,
    )
    killed = named == "drill:3"
    assert proc.stdout.split() == [str(i) for i in range(arrivals)] + ([] if killed else ["after"])
    assert proc.returncode == (-signal.SIGKILL if killed else 0)
    assert ("fault drill: killed at drill (3)" in proc.stderr) == killed


# --- mid-step: what each kill leaves behind, checked before the rerun -------------------------


def _no_round_task(project: Path, experiment: str) -> None:
    assert 1 not in ls.pushed_rounds(ls.connect(), f"xbl-{experiment}").rounds


def _half_written_masks(project: Path, experiment: str) -> None:
    assert (project / FEEDBACK / ".round-1.new" / "manifest.csv").is_file()
    assert not (project / FEEDBACK / "round-1").exists()


def _added_not_pushed(project: Path, experiment: str) -> None:
    assert (project / f"{FEEDBACK}.dvc").is_file()
    assert not feedback_in_remote(project)


def _run_without_model(name: str):
    def check(project: Path, experiment: str) -> None:
        client = _mlflow(project)
        (run,) = _runs(client, experiment, name, "RUNNING")
        assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")

    return check


def _decided_not_done(project: Path, experiment: str) -> None:
    (run,) = _runs(_mlflow(project), experiment, "feedback-round-1", "FINISHED")
    assert tracking.DECISION_TAG in run.data.tags
    assert tracking.PROMOTION_TAG not in run.data.tags


def _only_finish_round_1(project: Path) -> None:
    """The run after a crash in promotion finds round 1 decided and opens round 2: it is to
    stop there (pushed, waiting for a person), so round 1's end state is all that changed."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["labelstudio"]["annotator"] = "human"
    params["wait"]["mode"] = "resume"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


MID_STEP = {
    "push-partial": _no_round_task,
    "masks-partial": _half_written_masks,
    "dvc-add": _added_not_pushed,
    "mlflow-logging": _run_without_model("baseline"),  # the first model run: the baseline
    "mlflow-logging:2": _run_without_model("feedback-round-1"),  # the second: the retraining
    "promotion": _decided_not_done,
}


@pytest.mark.skipif(
    os.environ.get("XBL_FAULT_DRILLS") != "1",
    reason="slow mid-step fault drills: make test-fault-drills (XBL_FAULT_DRILLS=1)",
)
@pytest.mark.parametrize("crash", list(MID_STEP))
def test_a_crash_mid_step_ends_as_an_undisturbed_round(tmp_path, env, reference, crash):
    experiment = f"faults-{crash.replace(':', '-')}"
    project = make_project(tmp_path / "crashed", mlflow={"experiment": experiment}, **SETTINGS)
    code, output = run_round(project, env, crash_after=crash)
    assert code == -signal.SIGKILL, f"no crash at {crash}: {output[-2000:]}"
    assert f"fault drill: killed at {crash.partition(':')[0]}" in output
    MID_STEP[crash](project, experiment)

    if crash == "promotion":
        _only_finish_round_1(project)
    code, output = run_round(project, env)
    assert code == 0, output[-3000:]
    assert end_state(project, experiment) == reference
