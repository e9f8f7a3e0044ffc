"""The webhook receiver's HTTP edge over real loopback sockets, no other service: headers are
authenticated before a byte of the body is read, a stalled client is cut off, connections are
capped, and a claim left by a receiver that stopped mid-start is started again. And `xbl
serve`'s stop: its runner's process group ends within the grace period, hung or not."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flows.cli import _end_process_group
from services.labelstudio import SECRET_HEADER
from webhook import server as http
from webhook.auth import sign
from webhook.receiver import WebhookReceiver
from webhook.store import DeliveryStore

SECRET = secrets.token_urlsafe(24)
HUGE = 2**30  # declared, never sent


def payload(annotation_id: int = 1, round_: int = 1) -> bytes:
    task = {"id": 10, "project": 7, "data": {"round": round_}}
    annotation = {"id": annotation_id, "task": 10}
    return json.dumps(
        {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task}
    ).encode()


@pytest.fixture
def serve(tmp_path):
    """serve(**limits) -> a running receiver on a free loopback port, stopped after the test."""
    started = []

    def run(auth: str = "header", starts=None, **limits):
        receiver = WebhookReceiver(
            SECRET,
            DeliveryStore(tmp_path / "state"),
            lambda project, round_: (1, 1),
            lambda project, round_, attempt: (starts or []).append((round_, attempt)) or "run-1",
            auth=auth,
        )
        server = http.serve_in_thread(receiver, **limits)
        started.append(server)
        return server

    yield run
    for server in started:
        server.shutdown()
        server.server_close()
        server.receiver.stop_worker()
        server.receiver.store.close()


def connect(server) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=5)


def head(path: str = "/hooks", length: int = HUGE, **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, everything the server sent until it closed or went quiet)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return int(data.split(b" ", 2)[1]), data


def test_an_unknown_sender_is_refused_before_its_body_is_sent(serve):
    server = serve()
    for headers in ({}, {SECRET_HEADER: "x" * len(SECRET)}):
        with connect(server) as sock:
            began = time.monotonic()
            sock.sendall(head(**headers))  # 1 GiB declared, not one byte of it sent
            status, data = answer(sock)
            assert status == 401 and b"WWW-Authenticate" in data
            assert time.monotonic() - began < 2  # answered at once, then closed
    assert server.receiver.store.count("deliveries") == 0


def test_a_known_sender_with_an_oversized_body_gets_413_unread(serve):
    server = serve()
    with connect(server) as sock:
        sock.sendall(head(**{SECRET_HEADER: SECRET}))
        assert answer(sock)[0] == 413


def test_100_continue_is_said_only_to_an_authenticated_sender(serve):
    server = serve()
    body = payload()
    with connect(server) as sock:
        sock.sendall(head(length=len(body), Expect="100-continue"))
        status, data = answer(sock)
        assert status == 401 and b"100 Continue" not in data
    with connect(server) as sock:
        sock.sendall(head(length=len(body), Expect="100-continue", **{SECRET_HEADER: SECRET}))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        sock.settimeout(2)
        assert b"202 Accepted" in sock.recv(65536)


def test_a_refusal_after_a_sent_body_still_reaches_the_client(serve):
    """The body arrived but is never read; the answer comes all the same."""
    server = serve()
    body = b"x" * 200_000
    for _ in range(5):
        with connect(server) as sock:
            sock.sendall(head(length=len(body)) + body)
            assert answer(sock)[0] == 401


def test_a_signed_request_is_read_then_judged_by_its_signature(serve):
    server = serve(auth="signature")
    body = payload()
    with connect(server) as sock:  # no timestamp: refused on the headers alone
        sock.sendall(head(length=HUGE, X_Xbl_Signature="sha256=00"))
        assert answer(sock)[0] == 401
    with connect(server) as sock:
        sock.sendall(head(length=len(body), **sign("k" * 32, body)) + body)
        assert answer(sock)[0] == 401
    with connect(server) as sock:
        sock.sendall(head(length=len(body), **sign(SECRET, body)) + body)
        assert answer(sock)[0] == 202


def test_a_client_that_stalls_is_cut_off(serve):
    server = serve(request_timeout_s=1.0)
    with connect(server) as sock:  # headers accepted, then the body never comes
        sock.sendall(head(length=100, **{SECRET_HEADER: SECRET}) + b"{")
        began = time.monotonic()
        status, _ = answer(sock)
        assert status == 408 and 0.5 < time.monotonic() - began < 3
    with connect(server) as sock:  # a request line trickled a byte at a time
        began = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"POST /hooks HTTP/1.1\r\nHost: x\r\n" * 10:
                sock.send(bytes([byte]))
                time.sleep(0.1)
        assert time.monotonic() - began < 3
    assert server.wait_closed(1)


def test_over_the_cap_a_connection_gets_503_and_the_cap_frees_again(serve):
    server = serve(max_connections=2, request_timeout_s=5.0)
    held = [connect(server), connect(server)]  # connected, silent: each holds a thread
    time.sleep(0.2)
    with connect(server) as sock:
        sock.sendall(head(length=0, **{SECRET_HEADER: SECRET}))
        status, data = answer(sock)
        assert status == 503 and b"Retry-After" in data
    for sock in held:
        sock.close()
    assert server.wait_closed(2)
    body = payload()
    with connect(server) as sock:
        sock.sendall(head(length=len(body), **{SECRET_HEADER: SECRET}) + body)
        sock.settimeout(2)
        assert b"202 Accepted" in sock.recv(65536)


def test_a_round_claimed_by_a_receiver_that_stopped_mid_start_is_started_again(tmp_path):
    """The process stopped between claiming the round and recording its run: the next
    receiver starts it with the same attempt, so the same idempotency key."""
    store = DeliveryStore(tmp_path / "state")
    assert store.claim_round(7, 1) == 0  # then the process stopped
    starts = []
    receiver = WebhookReceiver(
        SECRET,
        store,
        lambda project, round_: (1, 1),
        lambda project, round_, attempt: starts.append(attempt) or "run-1",
    )
    receiver.check_round(7, 1)
    receiver.check_round(7, 1)  # now recorded: never twice
    assert starts == [0] and store.started_run(7, 1) == ("run-1", 0)
    store.close()


# --- `xbl serve`: its runner's process group ends on a stop, whatever the runner does ---------


def runner_group(script: str) -> subprocess.Popen:
    """A stand-in for the Prefect runner: a shell leading its own group, with a child."""
    return subprocess.Popen(["sh", "-c", script], start_new_session=True)


def live_members(group: int) -> list[int]:
    """The group's processes that are not zombies (an orphan's zombie may wait for init)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:  # it has just exited
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(
    ("script", "hangs"),
    [
        ("sleep 60 & wait", False),  # a runner that stops on SIGTERM
        ("trap '' TERM; sleep 60 & wait; sleep 60", True),  # one that hangs (its server gone)
    ],
)
def test_the_runners_group_ends_within_the_grace_period(script, hangs, capsys):
    leader = runner_group(script)
    time.sleep(0.3)  # the child has started
    assert len(live_members(leader.pid)) == 2
    began = time.monotonic()
    _end_process_group(leader, grace_s=1.5)
    took = time.monotonic() - began
    assert live_members(leader.pid) == []
    assert took < (1.5 + 1 if hangs else 1)
    assert ("killed it" in capsys.readouterr().err) == hangs
