"""Label Studio webhook receiver: the annotation that completes a round starts the next run.

Label Studio POSTs ANNOTATION_CREATED (or ANNOTATIONS_CREATED) here and waits for the answer
while it saves the annotation (its WEBHOOK_TIMEOUT is 1 s), so a request is only checked,
recorded and queued; one background thread asks Label Studio for the round's progress and,
once the target is met, starts the Prefect deployment.

- Authentication: a shared secret (env XBL_WEBHOOK_SECRET) in the X-XBL-Webhook-Secret header
  or as the path token of /hooks/<secret>; anything else gets 403 and starts nothing. The
  secret is never logged (request lines are redacted).
- Duplicates: each (action, annotation id) is recorded in a SQLite file in the state dir,
  so a redelivery, or a restart, never counts twice; a (project, round) starts at most one
  run, also across restarts.

    xbl webhook --host 127.0.0.1 --port 8787 --state-dir .xbl-webhook
    xbl webhook register --url http://127.0.0.1:8787/hooks [--project-id N]

Which run a round starts is the caller's `Starter` (the CLI starts a Prefect deployment), so
this module knows nothing of Prefect.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from services.labelstudio import ACTIONS, SECRET_HEADER
from xbl.labelstudio import annotation_target

log = logging.getLogger("services.webhook")

SECRET_ENV = "XBL_WEBHOOK_SECRET"
MIN_SECRET_LENGTH = 16
HOOK_PATH = "/hooks"
MAX_BODY_BYTES = 10 * 2**20  # a delivery carries one task's data and annotation: far below this

ProgressCheck = Callable[[int, int], tuple[int, int]]  # (project, round) -> (annotated, tasks)
Starter = Callable[[int, int], str | None]  # (project, round) -> id of the started run


class IgnoredDelivery(ValueError):
    """A well-formed request that asks for nothing (another action, a task outside a round)."""


@dataclass(frozen=True)
class Delivery:
    """One webhook request: which annotations were created, in which project and rounds."""

    action: str
    project_id: int
    annotations: tuple[tuple[int, int], ...]  # (annotation id, round)


# --- parsing ---------------------------------------------------------------------------------


def _as_list(value) -> list:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict)]


def _id(value) -> int | None:
    """An id given as a number or as an object that has one."""
    value = value.get("id") if isinstance(value, dict) else value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _task_rounds(tasks: list[dict]) -> dict[int, int]:
    """task id -> round, for the tasks xbl pushed (their data carries the round)."""
    rounds = {}
    for task in tasks:
        round_ = _id((task.get("data") or {}).get("round"))
        if round_ is not None and _id(task) is not None:
            rounds[_id(task)] = round_
    return rounds


def parse_delivery(payload) -> Delivery:
    """The annotations of an ANNOTATION(S)_CREATED payload that belong to an xbl round."""
    if not isinstance(payload, dict):
        raise IgnoredDelivery("payload is not a JSON object")
    action = payload.get("action")
    if action not in ACTIONS:
        raise IgnoredDelivery(f"action {action!r} is not handled")
    tasks = _as_list(payload.get("task"))
    rounds = _task_rounds(tasks)
    project = _id(payload.get("project")) or next((_id(t.get("project")) for t in tasks), None)
    found = tuple(
        (_id(a), rounds[_id(a.get("task"))])
        for a in _as_list(payload.get("annotation"))
        if _id(a) is not None and _id(a.get("task")) in rounds
    )
    if not found or project is None:
        raise IgnoredDelivery("no annotation of a task with data.round (is send_payload on?)")
    return Delivery(action, project, found)


# --- state -----------------------------------------------------------------------------------


class DeliveryStore:
    """Seen deliveries and started rounds, in SQLite so a restart remembers both."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS deliveries (
        action TEXT, annotation_id INTEGER, project_id INTEGER, round INTEGER,
        received_at REAL, checked INTEGER DEFAULT 0, PRIMARY KEY (action, annotation_id));
    CREATE TABLE IF NOT EXISTS started_rounds (
        project_id INTEGER, round INTEGER, flow_run TEXT, started_at REAL,
        PRIMARY KEY (project_id, round));
    """

    def __init__(self, state_dir: str | Path):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        ignore = state_dir / ".gitignore"  # state, never source: out of git wherever it lives
        if not ignore.exists():
            ignore.write_text("*\n")
        # One connection behind a lock: handler threads and the worker share it.
        self._db = sqlite3.connect(state_dir / "deliveries.sqlite3", check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(self.SCHEMA)

    def _run(self, sql: str, *args) -> sqlite3.Cursor:
        with self._lock, self._db:
            return self._db.execute(sql, args)

    def record(self, delivery: Delivery) -> list[tuple[int, int]]:
        """Store the delivery's annotations; the (project, round) pairs with a new one."""
        new = set()
        for annotation_id, round_ in delivery.annotations:
            cursor = self._run(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?, ?, 0)",
                delivery.action,
                annotation_id,
                delivery.project_id,
                round_,
                time.time(),
            )
            if cursor.rowcount:
                new.add((delivery.project_id, round_))
        return sorted(new)

    def unchecked(self) -> list[tuple[int, int]]:
        """Rounds with deliveries recorded but not yet checked (the process stopped first)."""
        rows = self._run("SELECT DISTINCT project_id, round FROM deliveries WHERE checked = 0")
        return [tuple(row) for row in rows.fetchall()]

    def mark_checked(self, project_id: int, round_: int) -> None:
        self._run(
            "UPDATE deliveries SET checked = 1 WHERE project_id = ? AND round = ?",
            project_id,
            round_,
        )

    def started(self, project_id: int, round_: int) -> bool:
        rows = self._run(
            "SELECT 1 FROM started_rounds WHERE project_id = ? AND round = ?", project_id, round_
        )
        return rows.fetchone() is not None

    def claim_round(self, project_id: int, round_: int) -> bool:
        """True for the first caller only: the round is now taken."""
        return bool(
            self._run(
                "INSERT OR IGNORE INTO started_rounds VALUES (?, ?, NULL, ?)",
                project_id,
                round_,
                time.time(),
            ).rowcount
        )

    def release_round(self, project_id: int, round_: int) -> None:
        self._run(
            "DELETE FROM started_rounds WHERE project_id = ? AND round = ?", project_id, round_
        )

    def set_flow_run(self, project_id: int, round_: int, flow_run: str | None) -> None:
        self._run(
            "UPDATE started_rounds SET flow_run = ? WHERE project_id = ? AND round = ?",
            flow_run,
            project_id,
            round_,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- the receiver ----------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """Authenticates, records and queues deliveries; its worker thread starts the runs."""

    secret: str = field(repr=False)
    store: DeliveryStore
    progress: ProgressCheck
    start: Starter
    target_fraction: float = 1.0
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _worker: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self):
        if len(self.secret or "") < MIN_SECRET_LENGTH:
            raise ValueError(
                f"the webhook secret must have at least {MIN_SECRET_LENGTH} characters "
                f"(set {SECRET_ENV})"
            )
        if not 0 < self.target_fraction <= 1:
            raise ValueError(f"target fraction must be in (0, 1], got {self.target_fraction}")

    def authorized(self, *candidates: str | None) -> bool:
        """Whether any candidate (header, path token) is the secret, in constant time."""
        expected = self.secret.encode()
        return any(
            hmac.compare_digest(c.encode("utf-8", "replace"), expected)
            for c in candidates
            if c is not None
        )

    def accept(self, payload) -> tuple[int, dict]:
        """(HTTP status, answer) for an authenticated delivery; the work is queued, not done."""
        try:
            delivery = parse_delivery(payload)
        except IgnoredDelivery as why:
            log.info("delivery ignored: %s", why)
            return 200, {"status": "ignored", "reason": str(why)}
        rounds = self.store.record(delivery)
        if not rounds:
            log.info(
                "duplicate %s delivery for annotation(s) %s",
                delivery.action,
                [a for a, _ in delivery.annotations],
            )
            return 200, {"status": "duplicate"}
        for key in rounds:
            self._queue.put(key)
        return 202, {"status": "queued", "rounds": [{"project": p, "round": r} for p, r in rounds]}

    def check_round(self, project_id: int, round_: int) -> None:
        """Start the round's run when enough of it is annotated and it has not started yet."""
        if self.store.started(project_id, round_):
            log.info("project %d round %d: run already started", project_id, round_)
        else:
            done, total = self.progress(project_id, round_)
            target = annotation_target(total, self.target_fraction)
            if total == 0 or done < target:
                log.info(
                    "project %d round %d: %d/%d annotated, waiting for %d",
                    project_id,
                    round_,
                    done,
                    total,
                    target,
                )
            elif self.store.claim_round(project_id, round_):
                self._start(project_id, round_, done, total)
        self.store.mark_checked(project_id, round_)

    def _start(self, project_id: int, round_: int, done: int, total: int) -> None:
        try:
            flow_run = self.start(project_id, round_)
        except BaseException:
            self.store.release_round(project_id, round_)  # a later delivery may try again
            raise
        self.store.set_flow_run(project_id, round_, flow_run)
        log.info(
            "project %d round %d: %d/%d annotated; started run %s",
            project_id,
            round_,
            done,
            total,
            flow_run,
        )

    def _work(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                self.check_round(*key)
            except Exception:  # unchecked rows stay; the next delivery or restart retries
                log.exception("project %d round %d: check failed", *key)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def start_worker(self) -> None:
        """Run the worker thread; rounds left unchecked by a previous process go first."""
        for key in self.store.unchecked():
            self._queue.put(key)
        self._worker = threading.Thread(target=self._work, name="xbl-webhook-worker", daemon=True)
        self._worker.start()

    def wait_idle(self) -> None:
        """Block until every queued round has been checked."""
        self._queue.join()

    def stop_worker(self, timeout_s: float = 10.0) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout_s)
            self._worker = None


# --- HTTP ------------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"(/hooks/)[^\s?#\"]+")


class WebhookHandler(BaseHTTPRequestHandler):
    server_version = "xbl-webhook"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    @property
    def receiver(self) -> WebhookReceiver:
        return self.server.receiver

    def _reply(self, status: int, answer: dict) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[bool, str | None]:
        """(is a hook path, path token) for /hooks and /hooks/<secret>."""
        path = urlsplit(self.path).path.rstrip("/")
        if path == HOOK_PATH:
            return True, None
        prefix, _, token = path.partition(HOOK_PATH + "/")
        return (not prefix and bool(token) and "/" not in token), unquote(token) or None

    def _body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            return None
        return self.rfile.read(length)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        is_hook, token = self._route()
        # The body is read before answering even a refusal: closing a socket with unread
        # data makes Linux reset the connection, and the client would see no answer at all.
        body = self._body()
        if body is None:
            self.close_connection = True
            return self._reply(413, {"error": "body too large or without Content-Length"})
        if not is_hook:
            return self._reply(404, {"error": "not found"})
        if not self.receiver.authorized(self.headers.get(SECRET_HEADER), token):
            return self._reply(403, {"error": "forbidden"})
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            return self._reply(400, {"error": "body is not JSON"})
        self._reply(*self.receiver.accept(payload))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Request lines go to logging, with a path token (the secret) masked."""
        message = _PATH_TOKEN.sub(r"\1***", format % args).replace(self.receiver.secret, "***")
        probe = urlsplit(getattr(self, "path", "")).path == "/health"  # every 10 s in Docker
        log.log(logging.DEBUG if probe else logging.INFO, "%s %s", self.address_string(), message)


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: WebhookReceiver, host: str = "127.0.0.1", port: int = 8787):
        self.receiver = receiver
        super().__init__((host, port), WebhookHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{HOOK_PATH}"

    def handle_error(self, request, client_address) -> None:
        log.exception("error while handling a request from %s", client_address[0])


def serve_in_thread(
    receiver: WebhookReceiver, host: str = "127.0.0.1", port: int = 0
) -> WebhookServer:
    """Start the worker and the server in background threads; `server.shutdown()` stops it."""
    receiver.start_worker()
    server = WebhookServer(receiver, host, port)
    threading.Thread(target=server.serve_forever, name="xbl-webhook-http", daemon=True).start()
    return server


def run_receiver(receiver: WebhookReceiver, host: str, port: int, what: str) -> int:
    """Serve in this thread until Ctrl-C or SIGTERM (docker stop), then shut down cleanly; the
    process's log goes to stderr at INFO."""
    # force: importing Prefect already put a WARNING-level handler on the root logger
    logging.basicConfig(
        level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    receiver.start_worker()
    server = WebhookServer(receiver, host, port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info(
        "receiving Label Studio webhooks at %s (%s, target %.0f%%)",
        server.url,
        what,
        100 * receiver.target_fraction,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        receiver.stop_worker()
        receiver.store.close()
    return 0
