"""The webhook receiver, over real HTTP on a loopback port: authentication (signed requests with
a timestamp window and no replays; Label Studio's static header; never a secret in the URL),
duplicates, one run per round unless it failed, expiring records, a fast answer, no secret in
the logs; and, with the local Label Studio server, a real delivery from a real annotation."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from flows.cli import deployment_starter, flow_run_failed
from flows.cli import main as xbl
from services.labelstudio import SECRET_HEADER, progress_checker, register_webhook
from tests.integration.ls_server import free_port
from tests.integration.project import REPO, make_project
from webhook import server as http
from webhook.auth import AUTH_MODES, SECRET_ENV, SIGNATURE_HEADER, sign
from webhook.delivery import Delivery, IgnoredDelivery, parse_delivery
from webhook.receiver import WebhookReceiver
from webhook.server import serve_in_thread
from webhook.store import DeliveryStore

SECRET = secrets.token_urlsafe(24)
PROJECT = 7


class StartRecorder:
    """The starter the receiver calls; remembers each (project, round) it was asked to run."""

    def __init__(self, failures: int = 0):
        self.calls: list[tuple[int, int]] = []
        self.attempts: list[int] = []
        self.failures = failures

    def __call__(self, project_id: int, round_: int, attempt: int = 0) -> str:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("Prefect API unreachable")
        self.calls.append((project_id, round_))
        self.attempts.append(attempt)
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


def post(
    url: str, payload, secret: str | None = SECRET, headers: dict | None = None, body=None
) -> tuple[int, dict]:
    """POST the payload (or raw `body`) with the static header `secret` and any `headers`."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode() if body is None else body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    if secret is not None:
        request.add_header(SECRET_HEADER, secret)
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

    def run(
        progress, starter, target_fraction: float = 1.0, state_dir=tmp_path / "state", **options
    ):
        receiver = WebhookReceiver(
            SECRET, DeliveryStore(state_dir), progress, starter, target_fraction, **options
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

    assert post(server.url, delivery(1, 10, 1), secret=None)[0] == 401
    assert post(server.url, delivery(1, 10, 1), secret="x" * len(SECRET))[0] == 401
    assert post(server.url + "/not-the-secret", delivery(1, 10, 1), secret=None)[0] == 403
    server.receiver.wait_idle()

    assert starts.calls == [] and progress.calls == 0
    assert server.receiver.store.unchecked() == []  # nothing was even recorded


def test_a_secret_in_the_url_is_refused(run_receiver):
    """The path token /hooks/<secret> was once accepted; a URL ends up in logs and proxies."""
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts)

    status, answer = post(f"{server.url}/{SECRET}", delivery(1, 10, 1), secret=None)
    also_with_the_header = post(f"{server.url}/{SECRET}", delivery(1, 10, 1))[0]
    server.receiver.wait_idle()

    assert status == also_with_the_header == 403 and "URL" in answer["error"]
    assert starts.calls == [] and server.receiver.store.unchecked() == []


def signed_post(url: str, payload, key: str = SECRET, timestamp: float | None = None, **kw):
    body = json.dumps(payload).encode()
    return post(url, None, secret=None, headers=sign(key, body, timestamp), body=body, **kw)


def test_a_signed_delivery_is_accepted_without_the_static_header(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts, auth="signature")

    status, answer = signed_post(server.url, delivery(1, 10, 1))
    server.receiver.wait_idle()

    assert (status, answer["status"]) == (202, "queued") and starts.calls == [(PROJECT, 1)]


def test_a_tampered_body_or_another_key_is_refused(run_receiver):
    progress, starts = Progress({(PROJECT, 1): (1, 1)}), StartRecorder()
    server = run_receiver(progress, starts)
    body = json.dumps(delivery(1, 10, 1)).encode()
    headers = sign(SECRET, body)
    tampered = body.replace(b'"round": 1', b'"round": 2')

    assert post(server.url, None, secret=None, headers=headers, body=tampered)[0] == 401
    assert signed_post(server.url, delivery(1, 10, 1), key="k" * len(SECRET))[0] == 401
    no_stamp = {SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}
    assert post(server.url, None, secret=None, headers=no_stamp, body=body)[0] == 401
    # a valid static header does not rescue a bad signature: the signature is judged alone
    assert post(server.url, None, headers=headers, body=tampered)[0] == 401
    server.receiver.wait_idle()

    assert starts.calls == [] and progress.calls == 0
    assert server.receiver.store.count("deliveries") == 0


@pytest.mark.parametrize("skew_s", [-301, 301])
def test_a_timestamp_outside_the_window_is_refused(run_receiver, skew_s):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts, window_s=300)

    status, answer = signed_post(server.url, delivery(1, 10, 1), timestamp=time.time() + skew_s)
    inside = signed_post(server.url, delivery(2, 11, 1), timestamp=time.time() - 250)[0]
    server.receiver.wait_idle()

    assert (status, answer["error"]) == (401, "timestamp outside the window")
    assert inside == 202 and starts.calls == [(PROJECT, 1)]


def test_a_replayed_signature_is_refused_also_after_a_restart(run_receiver, tmp_path):
    state, starts = tmp_path / "replay-state", StartRecorder()
    progress = Progress({(PROJECT, 1): (1, 2)})  # below target: each new delivery is checked
    first = run_receiver(progress, starts, state_dir=state)
    body = json.dumps(delivery(1, 10, 1)).encode()
    headers = sign(SECRET, body)

    assert post(first.url, None, secret=None, headers=headers, body=body)[0] == 202
    assert post(first.url, None, secret=None, headers=headers, body=body)[0] == 409
    first.receiver.wait_idle()
    stop(first)
    second = run_receiver(progress, starts, state_dir=state)
    assert post(second.url, None, secret=None, headers=headers, body=body)[0] == 409
    # the same body signed again, a second later, is a new request (then a duplicate delivery)
    again = post(
        second.url, None, secret=None, headers=sign(SECRET, body, time.time() + 1), body=body
    )
    second.receiver.wait_idle()

    assert again == (200, {"status": "duplicate"})  # accepted, and known as annotation 1
    assert progress.calls == 1 and starts.calls == []


def test_signature_mode_refuses_the_static_header(run_receiver):
    starts = StartRecorder()
    server = run_receiver(Progress({(PROJECT, 1): (1, 1)}), starts, auth="signature")

    assert post(server.url, delivery(1, 10, 1))[0] == 401
    server.receiver.wait_idle()
    assert starts.calls == []


def test_the_webhook_section_of_params_reaches_the_receiver(tmp_path, monkeypatch):
    served = []
    monkeypatch.setattr(http, "run_receiver", lambda receiver, *_: served.append(receiver) or 0)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    (tmp_path / "params.yaml").write_text(
        "webhook:\n  auth: signature\n  signature_window_s: 60\n  retention_days: 2\n"
    )

    state = str(tmp_path / "state")
    assert xbl(["--project", str(tmp_path), "webhook", "--port", "9", "--state-dir", state]) == 0
    receiver = served[-1]
    receiver.store.close()

    assert (receiver.auth, receiver.window_s, receiver.retention_s) == ("signature", 60, 2 * 86400)
    assert receiver.run_failed is flow_run_failed  # a failed run is retried


def test_the_settings_agree_with_the_receiver_defaults():
    from xbl.config import WebhookConfig

    settings = WebhookConfig()
    receiver_defaults = {f.name: f.default for f in WebhookReceiver.__dataclass_fields__.values()}
    assert settings.auth == receiver_defaults["auth"] and settings.auth in AUTH_MODES
    assert settings.signature_window_s == receiver_defaults["window_s"]
    assert settings.retention_days * 86400 == receiver_defaults["retention_s"]


def test_receiver_refuses_to_start_without_a_secret(monkeypatch, tmp_path):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(SystemExit) as stopped:
        xbl(["webhook", "--port", "0", "--state-dir", str(tmp_path / "state")])
    assert SECRET_ENV in str(stopped.value)
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


class RunStates:
    """The receiver's question to Prefect, answered from a set: did this run end failed?"""

    def __init__(self):
        self.failed: set[str] = set()

    def __call__(self, flow_run: str) -> bool:
        return flow_run in self.failed


def test_a_run_that_ends_failed_is_started_again_by_the_next_delivery(run_receiver):
    starts, states = StartRecorder(), RunStates()
    server = run_receiver(Progress({(PROJECT, 1): (4, 4)}), starts, run_failed=states)
    store = server.receiver.store

    def deliver(annotation_id: int) -> None:
        assert post(server.url, delivery(annotation_id, 10 + annotation_id, 1))[0] == 202
        server.receiver.wait_idle()

    deliver(1)
    deliver(2)  # flow-run-1 is scheduled or running: nothing more
    assert starts.calls == [(PROJECT, 1)] and store.started_run(PROJECT, 1) == ("flow-run-1", 0)

    states.failed.add("flow-run-1")  # it ends FAILED (or CRASHED)
    starts.failures = 1  # and the first try to start its successor fails too
    deliver(3)
    assert starts.calls == [(PROJECT, 1)] and store.started_run(PROJECT, 1) == ("flow-run-1", 1)
    deliver(4)
    assert starts.calls == [(PROJECT, 1)] * 2 and starts.attempts == [0, 2]
    assert store.started_run(PROJECT, 1) == ("flow-run-2", 2)
    deliver(5)  # the new run is live: nothing more
    assert len(starts.calls) == 2


# --- records expire --------------------------------------------------------------------------


def test_old_delivery_records_are_deleted_at_start_and_periodically(run_receiver, tmp_path):
    state, action = tmp_path / "expiry-state", "ANNOTATION_CREATED"
    eight_days_ago = time.time() - 8 * 86400
    store = DeliveryStore(state)
    store.record(Delivery(action, PROJECT, ((1, 1),)), received_at=eight_days_ago)
    store.record(Delivery(action, PROJECT, ((2, 1),)))  # recent
    store.mark_checked(PROJECT, 1)
    store.record(Delivery(action, PROJECT, ((3, 2),)), received_at=eight_days_ago)  # unchecked
    store.first_use("sha256=" + "0" * 64, eight_days_ago)  # a signature long out of its window
    store.close()

    def kept() -> set[int]:
        with sqlite3.connect(state / "deliveries.sqlite3") as db:
            return {row[0] for row in db.execute("SELECT annotation_id FROM deliveries")}

    starts = StartRecorder()
    server = run_receiver(
        Progress({(PROJECT, 1): (2, 2), (PROJECT, 2): (1, 1)}),
        starts,
        state_dir=state,
        retention_s=7 * 86400,
        purge_every_s=0.3,
    )
    server.receiver.wait_idle()
    # at start: the old checked record is gone, the recent one stays, and the old unchecked
    # one is kept until it has been checked (its round started a run)
    assert kept() >= {2} and 1 not in kept() and starts.calls == [(PROJECT, 2)]
    assert server.receiver.store.count("signatures") == 0
    assert wait_until(lambda: kept() == {2}, 10), "the periodic purge left the checked old record"
    assert post(server.url, delivery(2, 12, 1)) == (200, {"status": "duplicate"})


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
    post(f"{server.url}/{SECRET}", delivery(2, 11, 1), secret=None)  # refused, still logged
    post(f"{server.url}/{SECRET}x", delivery(3, 12, 1), secret=None)
    post(f"{server.url}?token={SECRET}", delivery(4, 13, 1), secret=None)
    signed_post(server.url, delivery(5, 14, 1))
    post(server.url, {"action": "PROJECT_UPDATED"})
    server.receiver.wait_idle()

    out, err = capfd.readouterr()
    assert "/hooks/***" in caplog.text and "/hooks?***" in caplog.text  # it did log requests
    assert "started run" in caplog.text
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


@pytest.mark.parametrize("end", ["Failed", "Crashed"])
def test_a_prefect_run_that_ended_failed_is_replaced_by_the_next_delivery(run_receiver, end):
    """A real flow run: while scheduled it blocks the round; once FAILED or CRASHED, the next
    delivery starts a new run (a new idempotency key), and only one."""
    import prefect.states
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    name = f"xbl-webhook-retry-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            client.create_flow_from_name(name), name="scheduled"
        )
        server = run_receiver(
            Progress({(PROJECT, 1): (3, 3)}),
            deployment_starter(f"{name}/scheduled"),
            run_failed=flow_run_failed,
        )
        store = server.receiver.store

        def deliver(annotation_id: int) -> None:
            assert post(server.url, delivery(annotation_id, 10 + annotation_id, 1))[0] == 202
            server.receiver.wait_idle()

        deliver(1)
        first, _ = store.started_run(PROJECT, 1)
        deliver(2)
        assert store.started_run(PROJECT, 1) == (first, 0) and not flow_run_failed(first)

        client.set_flow_run_state(uuid.UUID(first), getattr(prefect.states, end)(), force=True)
        assert flow_run_failed(first)
        deliver(3)
        second, attempt = store.started_run(PROJECT, 1)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )

    assert second != first and attempt == 1
    assert sorted(str(r.id) for r in runs) == sorted([first, second])
    assert next(r for r in runs if str(r.id) == second).state.is_scheduled()


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
            status, _ = post(server.url, delivery(annotation.id, task.id, 1, project.id))
            assert status == 200
            server.receiver.wait_idle()
            started = runs()
            assert len(started) == 1 and {"xbl-webhook", "round-1"} <= set(started[0].tags)
            assert [w.id for w in client.sdk.webhooks.list(project=str(project.id))] == [hook_id]
        finally:
            client.sdk.projects.delete(project.id)


# --- stopping on SIGTERM (a supervisor's stop: it kills 10 s later) ------------------------

STOPPED_WITHIN_S = 10.0


def wait_for(check, timeout_s: float, what: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited while waiting for {what}:\n{log.read_text()}"
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")


def stop_within(process: subprocess.Popen, limit_s: float = STOPPED_WITHIN_S) -> float:
    """SIGTERM, then the seconds the process took to exit (it must exit with 0)."""
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(limit_s) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return time.monotonic() - began


def xbl_process(args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_the_receiver_stops_on_sigterm_within_10_s_while_a_check_hangs(tmp_path):
    """Label Studio hangs (it accepts connections and never answers): the worker is stuck in
    a progress check, and a client holds a connection open. SIGTERM still ends the receiver
    in time, and the round it could not check is still recorded for the next start."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        port, state, log = free_port(), tmp_path / "state", tmp_path / "receiver.log"
        env = {
            **os.environ,
            SECRET_ENV: SECRET,
            "LABEL_STUDIO_URL": f"http://127.0.0.1:{hung.getsockname()[1]}",
            "LABEL_STUDIO_API_KEY": "never-checked",
            "XBL_WEBHOOK_TARGET_FRACTION": "1",
        }
        args = ["--project", str(tmp_path), "webhook", "--port", str(port)]
        receiver = xbl_process([*args, "--state-dir", str(state)], env, log)
        url = f"http://127.0.0.1:{port}/hooks"
        health = url.replace("/hooks", "/health")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        wait_for(lambda: opener.open(health, timeout=2).status == 200, 60, "/health", receiver, log)
        assert post(url, delivery(1, 10, 1))[0] == 202  # queued; the worker now hangs on it
        with socket.create_connection(("127.0.0.1", port)):  # silent: it holds a thread
            time.sleep(0.5)
            took = stop_within(receiver)
    assert "Traceback" not in log.read_text(), log.read_text()
    store = DeliveryStore(state)
    assert store.unchecked() == [(PROJECT, 1)] and store.count("started_rounds") == 0
    store.close()
    print(f"receiver stopped in {took:.1f} s")


def prefect_server(home, port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "prefect", "server", "start", "--no-ui"]
    return subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (read from /proc)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:  # it has just exited
                continue
            found |= {int(c) for c in children}
            todo += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_xbl_serve_stops_on_sigterm_within_10_s_also_after_its_prefect_server_went_away(
    tmp_path,
):
    """With its server up, the runner stops by itself and pauses its schedules. With the
    server gone, the runner would retry every API call of that; `xbl serve` ends it and its
    process group within SERVE_STOP_S all the same."""
    project = make_project(tmp_path / "project", schedule={"interval_s": 3600})
    port, server_log = free_port(), tmp_path / "server.log"
    api = f"http://127.0.0.1:{port}/api"
    server = prefect_server(tmp_path / "prefect-server", port, server_log)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def deployments() -> dict[str, bool]:
        """name -> paused"""
        request = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST")
        request.add_header("Content-Type", "application/json")
        return {d["name"]: d["paused"] for d in json.loads(opener.open(request, timeout=5).read())}

    def start_serving(log) -> subprocess.Popen:
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client")}
        serve = xbl_process(["--project", str(project), "serve"], env, log)
        served = {"scheduled": False, "baseline": False}
        wait_for(lambda: deployments() == served, 180, "the deployments", serve, log)
        time.sleep(1)  # the runner is polling the server now
        return serve

    serves = []
    try:
        up = f"{api}/health"
        wait_for(
            lambda: opener.open(up, timeout=2).status == 200, 120, "Prefect", server, server_log
        )
        serves.append(start_serving(tmp_path / "serve.log"))
        runners = descendants(serves[0].pid)
        took = stop_within(serves[0])
        assert "killed it" not in (tmp_path / "serve.log").read_text()
        assert deployments() == {"scheduled": True, "baseline": True}  # the runner's own stop
        assert runners and not [pid for pid in runners if alive(pid)]
        print(f"xbl serve stopped in {took:.1f} s with its Prefect server up")

        serves.append(start_serving(log := tmp_path / "serve-again.log"))
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        runners = descendants(serves[1].pid)
        took = stop_within(serves[1])
    finally:
        for process in (server, *serves):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert "killed it" in log.read_text()
    assert runners and not [pid for pid in runners if alive(pid)], log.read_text()
    print(f"xbl serve stopped in {took:.1f} s with its Prefect server gone")
