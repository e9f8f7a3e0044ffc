"""The webhook receiver, over real HTTP on a loopback port: authentication, duplicates, one run
per round, a fast answer, no secret in the logs; and, with the local Label Studio server, a real
delivery from a real annotation."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from flows.cli import deployment_starter
from flows.cli import main as xbl
from services import webhook
from services.labelstudio import progress_checker, register_webhook
from services.webhook import (
    DeliveryStore,
    IgnoredDelivery,
    WebhookReceiver,
    parse_delivery,
    serve_in_thread,
)

SECRET = secrets.token_urlsafe(24)
PROJECT = 7


class StartRecorder:
    """The starter the receiver calls; remembers each (project, round) it was asked to run."""

    def __init__(self, failures: int = 0):
        self.calls: list[tuple[int, int]] = []
        self.failures = failures

    def __call__(self, project_id: int, round_: int) -> str:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("Prefect API unreachable")
        self.calls.append((project_id, round_))
        return f"flow-run-{len(self.calls)}"


class Progress:
    """A progress check answering from a table; counts its calls."""

    def __init__(self, table: dict[tuple[int, int], tuple[int, int]]):
        self.table, self.calls = table, 0

    def __call__(self, project_id: int, round_: int) -> tuple[int, int]:
        self.calls += 1
        return self.table[(project_id, round_)]


def delivery(
    annotation_id: int,
    task_id: int,
    round_: int,
    project_id: int = PROJECT,
    action: str = "ANNOTATION_CREATED",
) -> dict:
    """A payload shaped like Label Studio's (send_payload on): annotation, task, project."""
    return {
        "action": action,
        "annotation": {"id": annotation_id, "task": task_id, "project": project_id, "result": []},
        "task": {
            "id": task_id,
            "project": project_id,
            "data": {"image_id": f"img-{task_id}", "round": round_},
        },
        "project": {"id": project_id, "title": "xbl-xbl"},
    }


def post(url: str, payload, secret: str | None = SECRET) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if secret is not None:
        request.add_header(webhook.SECRET_HEADER, secret)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def run_receiver(tmp_path):
    """Start a receiver on a free loopback port: run_receiver(progress, starter, ...) -> server."""
    started = []

    def run(progress, starter, target_fraction: float = 1.0, state_dir=tmp_path / "state"):
        receiver = WebhookReceiver(
            SECRET, DeliveryStore(state_dir), progress, starter, target_fraction
        )
        server = serve_in_thread(receiver)
        started.append(server)
        return server

    yield run
    for server in started:
        stop(server)


def stop(server) -> None:
    server.shutdown()
    server.server_close()
    server.receiver.stop_worker()
    server.receiver.store.close()


# --- authentication --------------------------------------------------------------------------


def test_missing_or_wrong_secret_is_refused_and_starts_nothing(run_receiver):
    progress, starts = Progress({(PROJECT, 1): (1, 1)}), StartRecorder()
    server = run_receiver(progress, starts)

    assert post(server.url, delivery(1, 10, 1), secret=None)[0] == 403
    assert post(server.url, delivery(1, 10, 1), secret="x" * len(SECRET))[0] == 403
    assert post(server.url + "/not-the-secret", delivery(1, 10, 1), secret=None)[0] == 403
    server.receiver.wait_idle()

    assert starts.calls == [] and progress.calls == 0
    assert server.receiver.store.unchecked() == []  # nothing was even recorded


def test_secret_as_path_token_is_accepted(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts)

    status, answer = post(f"{server.url}/{SECRET}", delivery(1, 10, 1), secret=None)
    server.receiver.wait_idle()

    assert (status, answer["status"]) == (202, "queued")
    assert starts.calls == [(PROJECT, 1)]


def test_receiver_refuses_to_start_without_a_secret(monkeypatch, tmp_path):
    monkeypatch.delenv(webhook.SECRET_ENV, raising=False)
    with pytest.raises(SystemExit) as stopped:
        xbl(["webhook", "--port", "0", "--state-dir", str(tmp_path / "state")])
    assert webhook.SECRET_ENV in str(stopped.value)
    with pytest.raises(ValueError):
        WebhookReceiver("short", DeliveryStore(tmp_path / "state"), Progress({}), StartRecorder())


# --- one run per round -----------------------------------------------------------------------


def test_the_same_delivery_twice_starts_one_run(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts)

    first = post(server.url, delivery(1, 10, 1))
    second = post(server.url, delivery(1, 10, 1))
    server.receiver.wait_idle()

    assert (first[0], second) == (202, (200, {"status": "duplicate"}))
    assert starts.calls == [(PROJECT, 1)]


def test_two_annotations_of_a_complete_round_start_one_run(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 2): (2, 2)}), starts)

    assert post(server.url, delivery(1, 10, 2))[0] == 202
    assert post(server.url, delivery(2, 11, 2))[0] == 202
    server.receiver.wait_idle()

    assert starts.calls == [(PROJECT, 2)]


def test_a_round_below_target_starts_nothing(run_receiver):
    starts, progress = StartRecorder(), Progress({(PROJECT, 1): (2, 3)})
    server = run_receiver(progress, starts, target_fraction=1.0)

    assert post(server.url, delivery(1, 10, 1))[0] == 202
    server.receiver.wait_idle()
    assert progress.calls == 1 and starts.calls == []

    progress.table[(PROJECT, 1)] = (3, 3)  # the last task gets its annotation
    post(server.url, delivery(2, 11, 1))
    server.receiver.wait_idle()
    assert starts.calls == [(PROJECT, 1)]


def test_a_target_fraction_below_one_starts_early(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (3, 4)}), starts, target_fraction=0.75)

    post(server.url, delivery(1, 10, 1))
    server.receiver.wait_idle()

    assert starts.calls == [(PROJECT, 1)]


def test_a_restart_remembers_deliveries_and_started_rounds(run_receiver, tmp_path):
    state, starts = tmp_path / "shared-state", StartRecorder()
    first = run_receiver(Progress({(PROJECT, 1): (2, 2)}), starts, state_dir=state)
    post(first.url, delivery(1, 10, 1))
    first.receiver.wait_idle()
    stop(first)

    progress = Progress({(PROJECT, 1): (2, 2)})
    second = run_receiver(progress, starts, state_dir=state)
    assert post(second.url, delivery(1, 10, 1)) == (200, {"status": "duplicate"})
    assert post(second.url, delivery(2, 11, 1))[0] == 202  # new annotation, round already run
    second.receiver.wait_idle()

    assert starts.calls == [(PROJECT, 1)]
    assert progress.calls == 0  # a started round is not even checked again


def test_a_failed_start_is_retried_by_the_next_delivery(run_receiver):
    starts = StartRecorder(failures=1)
    server = run_receiver(Progress({(PROJECT, 1): (2, 2)}), starts)

    post(server.url, delivery(1, 10, 1))
    server.receiver.wait_idle()
    assert starts.calls == []
    assert server.receiver.store.unchecked() == [(PROJECT, 1)]  # a restart would retry too

    post(server.url, delivery(2, 11, 1))
    server.receiver.wait_idle()
    assert starts.calls == [(PROJECT, 1)]


# --- answers fast, logs no secret ------------------------------------------------------------


class GatedProgress:
    """A progress check that blocks until the test releases it; says whether it has returned."""

    def __init__(self, answer: tuple[int, int]):
        self.answer, self.entered, self.release = answer, threading.Event(), threading.Event()
        self.returned = False

    def __call__(self, project_id: int, round_: int) -> tuple[int, int]:
        self.entered.set()
        self.release.wait(60)
        self.returned = True
        return self.answer


def test_the_answer_does_not_wait_for_a_slow_progress_check(run_receiver):
    starts, progress = StartRecorder(), GatedProgress((1, 1))
    server = run_receiver(progress, starts)

    # had the check run inside the request, this post would block on the gate and time out
    status, _ = post(server.url, delivery(1, 10, 1))
    answered_before_the_check = not progress.returned
    assert progress.entered.wait(10), "the queued round was never checked"
    progress.release.set()
    server.receiver.wait_idle()

    assert status == 202
    assert answered_before_the_check, "the answer waited for the progress check"
    assert starts.calls == [(PROJECT, 1)]


def test_the_secret_never_appears_in_the_log(run_receiver, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), StartRecorder())

    post(server.url, delivery(1, 10, 1))
    post(f"{server.url}/{SECRET}", delivery(2, 11, 1), secret=None)
    post(f"{server.url}/{SECRET}x", delivery(3, 12, 1), secret=None)  # refused, still logged
    post(server.url, {"action": "PROJECT_UPDATED"})
    server.receiver.wait_idle()

    out, err = capfd.readouterr()
    assert "/hooks/***" in caplog.text and "started run" in caplog.text  # it did log requests
    assert SECRET not in caplog.text + out + err


# --- payloads --------------------------------------------------------------------------------


def test_a_batch_delivery_maps_each_annotation_to_its_tasks_round():
    payload = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 3},
        "annotation": [{"id": 1, "task": 10}, {"id": 2, "task": 11}, {"id": 3, "task": 12}],
        "task": [
            {"id": 10, "data": {"round": 1}},
            {"id": 11, "data": {"round": "2"}},
            {"id": 12, "data": {"image": "not pushed by xbl"}},
        ],
    }

    parsed = parse_delivery(payload)

    assert (parsed.action, parsed.project_id, parsed.annotations) == (
        "ANNOTATIONS_CREATED",
        3,
        ((1, 1), (2, 2)),
    )


@pytest.mark.parametrize(
    "payload",
    [
        delivery(1, 10, 1, action="ANNOTATION_UPDATED"),
        {"action": "ANNOTATION_CREATED"},  # send_payload off: nothing to go on
        delivery(1, 10, 1) | {"task": {"id": 10, "data": {"image": "x"}}},  # not an xbl task
        [1, 2, 3],
    ],
)
def test_payloads_that_ask_for_nothing_are_ignored(payload):
    with pytest.raises(IgnoredDelivery):
        parse_delivery(payload)


# --- the real starter, against the session's Prefect server ----------------------------------


def test_the_deployment_starter_creates_one_flow_run_per_round():
    from prefect import get_client

    name = f"xbl-webhook-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        client.create_deployment(flow_id, name="scheduled")
        start = deployment_starter(f"{name}/scheduled")

        first, again, other = start(PROJECT, 1), start(PROJECT, 1), start(PROJECT, 2)
        run = client.read_flow_run(uuid.UUID(first))

    assert first == again != other  # the idempotency key: one run per round, on the server too
    assert run.state.is_scheduled() and {"xbl-webhook", "round-1"} <= set(run.tags)


# --- with the real Label Studio server -------------------------------------------------------

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="verdict" toName="image"><Choice value="ok"/></Choices></View>"""


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


@pytest.mark.integration
@pytest.mark.labelstudio
def test_a_real_annotation_starts_one_flow_run_even_when_delivered_twice(labelstudio, run_receiver):
    """Real Label Studio → receiver → real Prefect deployment; a redelivery starts nothing."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from services import labelstudio as ls

    client = ls.connect(labelstudio.url, labelstudio.token)
    project = client.sdk.projects.create(
        title=f"webhook-{uuid.uuid4().hex[:8]}", label_config=LABEL_CONFIG
    )
    name = f"xbl-webhook-e2e-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as prefect:
        deployment_id = prefect.create_deployment(
            prefect.create_flow_from_name(name), name="scheduled"
        )

        def runs():
            return prefect.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

        try:
            client.sdk.projects.import_tasks(
                project.id, request=[{"image": "/static/x.png", "round": 1}]
            )
            server = run_receiver(
                progress_checker(labelstudio.url, labelstudio.token),
                deployment_starter(f"{name}/scheduled"),
            )
            hook_id = register_webhook(client, project.id, server.url, SECRET)
            assert (
                register_webhook(client, project.id, server.url, SECRET) == hook_id
            )  # no duplicate

            task = next(iter(client.sdk.tasks.list(project=project.id)))
            annotation = client.sdk.annotations.create(
                task.id,
                was_cancelled=False,
                result=[
                    {
                        "from_name": "verdict",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["ok"]},
                    }
                ],
            )

            assert wait_until(lambda: len(runs()) == 1), "the annotation started no flow run"
            status, _ = post(server.url + "/hooks", delivery(annotation.id, task.id, 1, project.id))
            assert status == 200
            server.receiver.wait_idle()
            started = runs()
            assert len(started) == 1 and {"xbl-webhook", "round-1"} <= set(started[0].tags)
            assert [w.id for w in client.sdk.webhooks.list(project=str(project.id))] == [hook_id]
        finally:
            client.sdk.projects.delete(project.id)
