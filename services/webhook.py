"""Label Studio webhook receiver: the annotation that completes a round starts the next run.

Label Studio POSTs ANNOTATION_CREATED (or ANNOTATIONS_CREATED) here and waits for the answer
while it saves the annotation (its WEBHOOK_TIMEOUT is 1 s), so a request is only checked,
recorded and queued; one background thread asks Label Studio for the round's progress and,
once the target is met, starts the Prefect deployment.

- Authentication, with one shared secret (env XBL_WEBHOOK_SECRET), in one of two modes:
  * signed: X-Xbl-Timestamp (Unix seconds) and X-Xbl-Signature: sha256=<hex HMAC-SHA256 of
    "<timestamp>." + body under the secret>. Checked in constant time; a timestamp further
    than `webhook.signature_window_s` from the clock, or a signature already seen, is refused.
    It protects against a forged or altered body and against replays; the secret never
    travels. `sign()` makes the headers.
  * static header (`webhook.auth: header`, the default): the secret itself in the
    X-XBL-Webhook-Secret header. Label Studio sends only fixed headers, so it cannot sign:
    this is its mode, and it keeps out only callers who do not know the secret. With
    `webhook.auth: signature` the header is refused.
  The secret is never accepted in the URL: /hooks/<anything> is refused (403), and request
  lines are logged with path tokens and query strings masked.
- Duplicates: each (action, annotation id) is recorded in a SQLite file in the state dir,
  so a redelivery, or a restart, never counts twice; a (project, round) starts one run, also
  across restarts, unless that run ended FAILED or CRASHED: then the round's next delivery
  starts a new one. Records older than `webhook.retention_days` are deleted at start and
  hourly.

    xbl webhook --host 127.0.0.1 --port 8787 --state-dir .xbl-webhook
    xbl webhook register --url http://127.0.0.1:8787/hooks [--project-id N]

Which run a round starts is the caller's `Starter` (the CLI starts a Prefect deployment), so
this module knows nothing of Prefect.
"""

from __future__ import annotations

import hashlib
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
from urllib.parse import urlsplit

from services.labelstudio import ACTIONS, SECRET_HEADER
from xbl.labelstudio.results import annotation_target

log = logging.getLogger("services.webhook")

SECRET_ENV = "XBL_WEBHOOK_SECRET"
MIN_SECRET_LENGTH = 16
HOOK_PATH = "/hooks"
MAX_BODY_BYTES = 10 * 2**20  # a delivery carries one task's data and annotation: far below this

TIMESTAMP_HEADER = "X-Xbl-Timestamp"
SIGNATURE_HEADER = "X-Xbl-Signature"
SIGNATURE_PREFIX = "sha256="
AUTH_MODES = ("header", "signature")
PURGE_EVERY_S = 3600.0

ProgressCheck = Callable[[int, int], tuple[int, int]]  # (project, round) -> (annotated, tasks)
# (project, round, attempt) -> id of the started run; attempt 0 first, then 1, 2, ... after
# a run that failed (so an idempotency key made from the three is new for each retry)
Starter = Callable[[int, int, int], str | None]
RunFailed = Callable[[str], bool]  # run id -> whether it ended FAILED or CRASHED


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Xbl-Signature value: HMAC-SHA256 of "<timestamp>." + body under the secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def sign(secret: str, body: bytes, timestamp: float | None = None) -> dict[str, str]:
    """The headers a signed delivery carries (timestamp: now unless given)."""
    stamp = str(int(time.time() if timestamp is None else timestamp))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body)}


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
    CREATE TABLE IF NOT EXISTS signatures (signature TEXT PRIMARY KEY, timestamp REAL);
    CREATE INDEX IF NOT EXISTS deliveries_received ON deliveries (received_at);
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
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(started_rounds)")}
            if "attempt" not in columns:  # a state dir from before retries
                self._db.execute(
                    "ALTER TABLE started_rounds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0"
                )

    def _run(self, sql: str, *args) -> sqlite3.Cursor:
        with self._lock, self._db:
            return self._db.execute(sql, args)

    def record(self, delivery: Delivery, received_at: float | None = None) -> list[tuple[int, int]]:
        """Store the delivery's annotations; the (project, round) pairs with a new one."""
        new = set()
        for annotation_id, round_ in delivery.annotations:
            cursor = self._run(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?, ?, 0)",
                delivery.action,
                annotation_id,
                delivery.project_id,
                round_,
                time.time() if received_at is None else received_at,
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
        return self.started_run(project_id, round_) is not None

    def started_run(self, project_id: int, round_: int) -> tuple[str | None, int] | None:
        """(run id, attempt) of the round's run; None when it has not been started."""
        rows = self._run(
            "SELECT flow_run, attempt FROM started_rounds WHERE project_id = ? AND round = ?",
            project_id,
            round_,
        )
        row = rows.fetchone()
        return None if row is None else (row[0], row[1])

    def claim_round(
        self, project_id: int, round_: int, failed_run: str | None = None
    ) -> int | None:
        """The attempt number for the first caller only (the round is now taken), else None.
        With `failed_run`: take over a round whose run `failed_run` ended failed."""
        if failed_run is None:
            cursor = self._run(
                "INSERT OR IGNORE INTO started_rounds VALUES (?, ?, NULL, ?, 0)",
                project_id,
                round_,
                time.time(),
            )
            return 0 if cursor.rowcount else None
        with self._lock, self._db:
            taken = self._db.execute(
                "UPDATE started_rounds SET flow_run = NULL, attempt = attempt + 1, started_at = ?"
                " WHERE project_id = ? AND round = ? AND flow_run = ?",
                (time.time(), project_id, round_, failed_run),
            ).rowcount
            if not taken:
                return None
            return self._db.execute(
                "SELECT attempt FROM started_rounds WHERE project_id = ? AND round = ?",
                (project_id, round_),
            ).fetchone()[0]

    def release_round(
        self, project_id: int, round_: int, attempt: int = 0, failed_run: str | None = None
    ) -> None:
        """Undo a claim whose start failed, so a later delivery tries again: the first attempt
        forgets the round; a retry puts the failed run back (its attempt number stays used)."""
        if failed_run is None:
            self._run(
                "DELETE FROM started_rounds WHERE project_id = ? AND round = ? AND attempt = ?",
                project_id,
                round_,
                attempt,
            )
        else:
            self._run(
                "UPDATE started_rounds SET flow_run = ? WHERE project_id = ? AND round = ?",
                failed_run,
                project_id,
                round_,
            )

    def first_use(self, signature: str, timestamp: float) -> bool:
        """Record a verified signature; False when it was seen before (a replay)."""
        cursor = self._run("INSERT OR IGNORE INTO signatures VALUES (?, ?)", signature, timestamp)
        return bool(cursor.rowcount)

    def expire(self, retention_s: float, window_s: float, now: float | None = None) -> int:
        """Delete checked delivery records older than `retention_s`, and signatures whose
        timestamp is out of the window anyway (a replay of one is refused as stale). Rows
        not yet checked stay until they are. Returns the number of deliveries deleted."""
        now = time.time() if now is None else now
        deleted = self._run(
            "DELETE FROM deliveries WHERE checked = 1 AND received_at < ?", now - retention_s
        ).rowcount
        self._run("DELETE FROM signatures WHERE timestamp < ?", now - window_s)
        return deleted

    def count(self, table: str) -> int:
        if table not in ("deliveries", "started_rounds", "signatures"):
            raise ValueError(f"no table {table!r}")
        return self._run(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608 (checked)

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
    auth: str = "header"  # or "signature": signed requests only
    window_s: float = 300.0  # a signed request's timestamp is at most this far from the clock
    retention_s: float = 7 * 86400.0  # delivery records older than this are deleted
    run_failed: RunFailed | None = None  # None: a started round is never started again
    purge_every_s: float = PURGE_EVERY_S
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
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, got {self.auth!r}")
        if not (self.window_s > 0 and self.retention_s > 0):
            raise ValueError("the signature window and the retention must be above 0")

    def authorized(self, *candidates: str | None) -> bool:
        """Whether any candidate is the secret, in constant time."""
        expected = self.secret.encode()
        return any(
            hmac.compare_digest(c.encode("utf-8", "replace"), expected)
            for c in candidates
            if c is not None
        )

    def authenticate(self, headers, body: bytes) -> tuple[int, str] | None:
        """None when the request may go on, else (HTTP status, error). A request that carries
        a signature is judged by it alone; a static header is accepted only in header mode."""
        given = headers.get(SIGNATURE_HEADER)
        if given is not None:
            stamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
            if not re.fullmatch(r"\d{1,12}", stamp):
                return 403, "forbidden"
            expected = signature(self.secret, stamp, body)
            if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected.encode()):
                return 403, "forbidden"
            # only now, the sender being known, does it learn what else is wrong
            if abs(time.time() - int(stamp)) > self.window_s:
                return 403, "timestamp outside the window"
            if not self.store.first_use(expected, int(stamp)):
                log.warning("replayed signature refused (timestamp %s)", stamp)
                return 409, "replayed signature"
            return None
        if self.auth == "header" and self.authorized(headers.get(SECRET_HEADER)):
            return None
        return 403, "forbidden"

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

    def _failed_run(self, project_id: int, round_: int) -> tuple[bool, str | None]:
        """(whether the round is taken by a live or finished run, the run that failed)."""
        started = self.store.started_run(project_id, round_)
        if started is None:
            return False, None
        flow_run, attempt = started
        if flow_run is None or self.run_failed is None or not self.run_failed(flow_run):
            log.info("project %d round %d: run %s already started", project_id, round_, flow_run)
            return True, None
        log.warning(
            "project %d round %d: run %s (attempt %d) ended failed; starting it again",
            project_id,
            round_,
            flow_run,
            attempt,
        )
        return False, flow_run

    def check_round(self, project_id: int, round_: int) -> None:
        """Start the round's run when enough of it is annotated and it has not started yet,
        or its run ended FAILED or CRASHED."""
        taken, failed = self._failed_run(project_id, round_)
        if not taken:
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
            elif (attempt := self.store.claim_round(project_id, round_, failed)) is not None:
                self._start(project_id, round_, attempt, failed, done, total)
        self.store.mark_checked(project_id, round_)

    def _start(
        self, project_id: int, round_: int, attempt: int, failed: str | None, done: int, total: int
    ) -> None:
        try:
            flow_run = self.start(project_id, round_, attempt)
        except BaseException:  # a later delivery may try again
            self.store.release_round(project_id, round_, attempt, failed)
            raise
        self.store.set_flow_run(project_id, round_, flow_run)
        log.info(
            "project %d round %d: %d/%d annotated; started run %s (attempt %d)",
            project_id,
            round_,
            done,
            total,
            flow_run,
            attempt,
        )

    def purge(self) -> None:
        """Delete expired delivery records and signatures (at start, then hourly)."""
        deleted = self.store.expire(self.retention_s, self.window_s)
        if deleted:
            log.info("deleted %d delivery record(s) older than %.0f s", deleted, self.retention_s)

    def _work(self) -> None:
        next_purge = time.monotonic() + self.purge_every_s
        while True:
            try:
                key = self._queue.get(timeout=max(0.0, next_purge - time.monotonic()))
            except queue.Empty:
                key = ()
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_every_s
                try:
                    self.purge()
                except Exception:
                    log.exception("purging expired delivery records failed")
            if key == ():
                continue
            if key is None:
                self._queue.task_done()
                return
            try:
                self.check_round(*key)
            except Exception:  # unchecked rows stay; the next delivery or restart retries
                log.exception("project %d round %d: check failed", *key)
            finally:
                self._queue.task_done()

    def start_worker(self) -> None:
        """Run the worker thread, after deleting expired records; rounds left unchecked by a
        previous process go first."""
        self.purge()
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
_QUERY = re.compile(r"\?[^\s#\"]*")


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

    def _route(self) -> str:
        """ "hook" for /hooks, "token" for /hooks/<anything> (a secret in the URL, refused),
        else "other"."""
        path = urlsplit(self.path).path.rstrip("/")
        if path == HOOK_PATH:
            return "hook"
        return "token" if path.startswith(HOOK_PATH + "/") else "other"

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
        route = self._route()
        # The body is read before answering even a refusal: closing a socket with unread
        # data makes Linux reset the connection, and the client would see no answer at all.
        body = self._body()
        if body is None:
            self.close_connection = True
            return self._reply(413, {"error": "body too large or without Content-Length"})
        if route == "other":
            return self._reply(404, {"error": "not found"})
        if route == "token":  # once accepted; a URL ends up in logs and proxies: never again
            return self._reply(403, {"error": "a secret in the URL is not accepted"})
        refused = self.receiver.authenticate(self.headers, body)
        if refused is not None:
            return self._reply(refused[0], {"error": refused[1]})
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            return self._reply(400, {"error": "body is not JSON"})
        self._reply(*self.receiver.accept(payload))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Request lines go to logging, with path tokens and query strings masked."""
        message = _QUERY.sub("?***", _PATH_TOKEN.sub(r"\1***", format % args))
        message = message.replace(self.receiver.secret, "***")
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
