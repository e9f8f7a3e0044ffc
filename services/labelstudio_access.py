"""Reaching Label Studio without its SDK, whose import alone takes a second: which server and
token to use, the Authorization header a token gives, and the errors. services/labelstudio.py
(the SDK client) and `xbl status` (services/status.py, which must answer at once) share them.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import urlparse

import httpx

from xbl.errors import XblError

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 8089


class LabelStudioError(RuntimeError):
    """The server answered, but not as needed (rejected token, invalid request)."""


class LabelStudioUnavailable(LabelStudioError):
    """The server could not be reached."""


class LabelStudioRefused(LabelStudioError, XblError):
    """A setting the user must fix (no token, a rejected token): a retry cannot help, so
    Prefect's tasks never retry it (tasks.is_transient)."""


def _local_settings() -> dict[str, str]:
    """XBL_LABEL_STUDIO_* from the environment over the git-ignored .labelstudio/env file."""
    home = Path(os.environ.get("XBL_LABEL_STUDIO_HOME") or PROJECT_DIR / ".labelstudio")
    values: dict[str, str] = {}
    env_file = home / "env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
    values.update({k: v for k, v in os.environ.items() if k.startswith("XBL_LABEL_STUDIO_") and v})
    return values


def server_settings() -> tuple[str, str | None]:
    """(url, token) of the server to use: a team's server when LABEL_STUDIO_URL is set, else
    the local one of infra/labelstudio.sh."""
    if os.environ.get("LABEL_STUDIO_URL"):
        token = os.environ.get("LABEL_STUDIO_API_KEY")
        if not token:
            raise LabelStudioRefused("LABEL_STUDIO_URL is set but LABEL_STUDIO_API_KEY is not")
        return os.environ["LABEL_STUDIO_URL"], token
    local = _local_settings()
    port = local.get("XBL_LABEL_STUDIO_PORT") or DEFAULT_PORT
    return f"http://127.0.0.1:{port}", local.get("XBL_LABEL_STUDIO_TOKEN")


def is_loopback(url: str) -> bool:
    """A server on this machine, which no proxy setting may route elsewhere."""
    return urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def authorization(http: httpx.Client, token: str) -> str:
    """The Authorization header for `token` on the server `http` talks to: a legacy token as
    is; a personal access token (a JWT refresh token) exchanged for an access token first, as
    the SDK does."""
    claims = _jwt_claims(token)
    if claims is None:
        return f"Token {token}"
    if claims.get("token_type") == "refresh":
        answer = http.post("/api/token/refresh/", json={"refresh": token})
        answer.raise_for_status()
        token = answer.json()["access"]
    return f"Bearer {token}"


def _jwt_claims(token: str) -> dict | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
