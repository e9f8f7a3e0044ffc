"""The HTTP endpoint: POST /hooks takes a delivery, GET /health answers the probe. A request
is answered at once; the receiver's worker does the rest."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from services.labelstudio import SECRET_HEADER
from webhook.auth import SIGNATURE_HEADER
from webhook.receiver import WebhookReceiver

log = logging.getLogger(__name__)

HOOK_PATH = "/hooks"
MAX_BODY_BYTES = 10 * 2**20  # a delivery carries one task's data and annotation: far below this
# Label Studio sends a delivery in well under a second (its WEBHOOK_TIMEOUT is 1 s): a
# connection gets this long for each request, idle wait, request line, headers and body
# together, so a client that trickles bytes (slow loris) cannot hold a thread for long.
REQUEST_TIMEOUT_S = 10.0
# Handler threads at once; one more connection is answered 503 at once. Label Studio delivers
# one request per saved annotation; a team's annotators stay far below this.
MAX_CONNECTIONS = 32
# After a refusal sent before the body was read: how long, and how many bytes, to discard
# what the client still sends, so the close does not reset the connection under the answer.
LINGER_S = 1.0
LINGER_BYTES = 256 * 2**10
_PATH_TOKEN = re.compile(rf"({HOOK_PATH}/)[^\s?#\"]+")  # a secret put in the path
_QUERY = re.compile(r"\?[^\s#\"]*")


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, each read allowed only the time left until `deadline`."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request timeout")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class WebhookHandler(BaseHTTPRequestHandler):
    server_version = "xbl-webhook"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    @property
    def receiver(self) -> WebhookReceiver:
        return self.server.receiver

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket closes only once every file made from it is closed
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.request_timeout_s
        self._continue = False
        super().handle_one_request()  # a TimeoutError there closes the connection

    def handle_expect_100(self) -> bool:
        """Say "100 Continue" only once the headers are authenticated (`do_POST`): a refused
        client never sends its body."""
        self._continue = True
        return True

    def _reply(self, status: int, answer: dict) -> None:
        body = json.dumps(answer).encode()
        self.connection.settimeout(self.server.request_timeout_s)  # a client that never reads
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", f'{self._auth_header()} realm="xbl-webhook"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _auth_header(self) -> str:
        return SIGNATURE_HEADER if self.receiver.auth == "signature" else SECRET_HEADER

    def _refuse_unread(self, status: int, answer: dict) -> None:
        """Answer before the body is read, then close: the body, if it comes, is discarded
        (`linger`), never parsed."""
        self.close_connection = True
        self._reply(status, answer)
        self.wfile.flush()
        linger(self.connection)

    def _route(self) -> str:
        """ "hook" for /hooks, "token" for /hooks/<anything> (a secret in the URL, refused),
        else "other"."""
        path = urlsplit(self.path).path.rstrip("/")
        if path == HOOK_PATH:
            return "hook"
        return "token" if path.startswith(HOOK_PATH + "/") else "other"

    def _length(self) -> int | None:
        """The declared body length when it can be read, else None (too large, malformed, or
        chunked, which a delivery never is)."""
        if self.headers.get("Transfer-Encoding"):
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        return length if 0 <= length <= MAX_BODY_BYTES else None

    def _refusal(self) -> tuple[int, str] | None:
        """What the request line and headers alone refuse, checked before the body is read."""
        route = self._route()
        if route == "other":
            return 404, "not found"
        if route == "token":  # once accepted; a URL ends up in logs and proxies: never again
            return 403, "a secret in the URL is not accepted"
        refused = self.receiver.authenticate_headers(self.headers)
        if refused is None and self._length() is None:
            return 413, f"the body must have a Content-Length of at most {MAX_BODY_BYTES} bytes"
        return refused

    def _body(self, length: int) -> bytes | None:
        """The body, or None (after answering) when the client stalls or stops sending it."""
        if self._continue:
            self.send_response_only(100)
            self.end_headers()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._reply(408, {"error": "the body did not arrive in time"})
            return None
        if len(body) < length:  # the client closed early; there is no one to answer
            self.close_connection = True
            return None
        return body

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        refused = self._refusal()
        if refused is not None:
            return self._refuse_unread(refused[0], {"error": refused[1]})
        body = self._body(self._length())
        if body is None:
            return None
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


def linger(sock: socket.socket) -> None:
    """Close our side for writing, then discard what the client still sends, for at most
    LINGER_S and LINGER_BYTES. Closing a socket with unread data resets the connection, and
    a client whose stack drops what it received on a reset (Windows does) loses the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline, discarded = time.monotonic() + LINGER_S, 0
        while discarded < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(64 * 2**10)
            if not chunk:
                return
            discarded += len(chunk)
    except OSError:  # TimeoutError included: the client neither sent more nor closed
        pass


class WebhookServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at once; each request must arrive
    within `request_timeout_s`."""

    daemon_threads = True

    def __init__(
        self,
        receiver: WebhookReceiver,
        host: str = "127.0.0.1",
        port: int = 8787,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ):
        self.receiver = receiver
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._open = 0  # connections being handled
        self._changed = threading.Condition()
        super().__init__((host, port), WebhookHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{HOOK_PATH}"

    def process_request(self, request, client_address) -> None:
        with self._changed:
            full = self._open >= self.max_connections
            self._open += 0 if full else 1
        if full:
            return self._refuse_busy(request, client_address)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def _refuse_busy(self, request: socket.socket, client_address) -> None:
        """503 from the accepting thread itself, without waiting on the client: the answer
        fits the socket's buffer, and only what has already arrived is discarded."""
        log.warning("%s refused: %d connections open", client_address[0], self.max_connections)
        body = json.dumps({"error": "too many connections, retry"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.setblocking(False)
            request.send(head.encode() + body)
            request.shutdown(socket.SHUT_WR)
            request.recv(LINGER_BYTES)
        except OSError:  # BlockingIOError included: nothing more has arrived
            pass
        request.close()

    def wait_closed(self, timeout_s: float) -> bool:
        """Wait until no connection is being handled; False when some still are."""
        with self._changed:
            return self._changed.wait_for(lambda: self._open == 0, timeout_s)

    def handle_error(self, request, client_address) -> None:
        log.exception("error while handling a request from %s", client_address[0])


def serve_in_thread(
    receiver: WebhookReceiver, host: str = "127.0.0.1", port: int = 0, **limits
) -> WebhookServer:
    """Start the worker and the server in background threads; `server.shutdown()` stops it.
    `limits`: max_connections, request_timeout_s (default MAX_CONNECTIONS, REQUEST_TIMEOUT_S)."""
    receiver.start_worker()
    server = WebhookServer(receiver, host, port, **limits)
    threading.Thread(target=server.serve_forever, name="xbl-webhook-http", daemon=True).start()
    return server


# On SIGTERM: requests being handled get this long to finish, then the worker its check, so
# the process is gone before a supervisor's kill (docker stop and Kubernetes wait 10 s, then
# SIGKILL)
STOP_REQUESTS_S = 2.0
STOP_WORKER_S = 4.0


class _Stop(Exception):
    """SIGTERM arrived: leave serve_forever."""


def run_receiver(receiver: WebhookReceiver, host: str, port: int, what: str) -> int:
    """Serve in this thread until Ctrl-C or SIGTERM (docker stop), then stop within
    STOP_REQUESTS_S + STOP_WORKER_S; the process's log goes to stderr at INFO."""
    # force: importing Prefect already put a WARNING-level handler on the root logger
    logging.basicConfig(
        level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    receiver.start_worker()
    server = WebhookServer(receiver, host, port)
    signal.signal(signal.SIGTERM, _raise_stop)
    log.info(
        "receiving Label Studio webhooks at %s (%s, target %.0f%%)",
        server.url,
        what,
        100 * receiver.target_fraction,
    )
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        log.info("stopping: no new connections")
    finally:
        _stop(server, receiver)
    return 0


def _raise_stop(*_) -> None:
    raise _Stop


def _stop(server: WebhookServer, receiver: WebhookReceiver) -> None:
    """Close the port, let open requests finish, then the worker's check. A delivery recorded
    but not checked is checked at the next start; a check still running is abandoned with
    the process (its thread is a daemon), and its round checked again at the next start."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
    server.server_close()
    idle = server.wait_closed(STOP_REQUESTS_S)
    if not idle:
        log.warning("stopping with requests still open (their clients will retry)")
    if not receiver.stop_worker(STOP_WORKER_S):
        log.warning("stopping during a round's check; it runs again at the next start")
    elif idle:  # else a thread still uses it; the process's exit closes it
        receiver.store.close()
