"""The HTTP endpoint: POST /hooks takes a delivery, GET /health answers the probe. A request
is answered at once; the receiver's worker does the rest."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from webhook.receiver import WebhookReceiver

log = logging.getLogger(__name__)

HOOK_PATH = "/hooks"
MAX_BODY_BYTES = 10 * 2**20  # a delivery carries one task's data and annotation: far below this
_PATH_TOKEN = re.compile(rf"({HOOK_PATH}/)[^\s?#\"]+")  # a secret put in the path
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
