"""Who may deliver: a request signed with the shared secret (HMAC-SHA256 over timestamp and
body), or, in header mode, the secret itself in Label Studio's static header."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable

from services.labelstudio import SECRET_HEADER

log = logging.getLogger(__name__)

SECRET_ENV = "XBL_WEBHOOK_SECRET"
MIN_SECRET_LENGTH = 16
TIMESTAMP_HEADER = "X-Xbl-Timestamp"
SIGNATURE_HEADER = "X-Xbl-Signature"
SIGNATURE_PREFIX = "sha256="
AUTH_MODES = ("header", "signature")

FirstUse = Callable[[str, float], bool]  # (signature, timestamp) -> not seen before
UNAUTHORIZED = 401, "unauthorized"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Xbl-Signature value: HMAC-SHA256 of "<timestamp>." + body under the secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def sign(secret: str, body: bytes, timestamp: float | None = None) -> dict[str, str]:
    """The headers a signed delivery carries (timestamp: now unless given)."""
    stamp = str(int(time.time() if timestamp is None else timestamp))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body)}


def is_secret(secret: str, *candidates: str | None) -> bool:
    """Whether any candidate is the secret, in constant time."""
    expected = secret.encode()
    return any(
        hmac.compare_digest(c.encode("utf-8", "replace"), expected)
        for c in candidates
        if c is not None
    )


def _timestamp(headers) -> str | None:
    """The X-Xbl-Timestamp header when it is Unix seconds, else None."""
    stamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
    return stamp if re.fullmatch(r"\d{1,12}", stamp) else None


def header_refusal(headers, secret: str, mode: str) -> tuple[int, str] | None:
    """What the headers alone decide, before one byte of the body is read: None when the body
    may be read. A static header is judged here in full; a signed request only by the form of
    its timestamp, since its signature covers the body."""
    if headers.get(SIGNATURE_HEADER) is not None:
        return None if _timestamp(headers) else UNAUTHORIZED
    if mode == "header" and is_secret(secret, headers.get(SECRET_HEADER)):
        return None
    return UNAUTHORIZED


def refusal(
    headers, body: bytes, secret: str, mode: str, window_s: float, first_use: FirstUse
) -> tuple[int, str] | None:
    """None when the request may go on, else (HTTP status, error). A request that carries
    a signature is judged by it alone; a static header is accepted only in header mode."""
    given = headers.get(SIGNATURE_HEADER)
    if given is not None:
        return _signature_refusal(headers, given, body, secret, window_s, first_use)
    if mode == "header" and is_secret(secret, headers.get(SECRET_HEADER)):
        return None
    return UNAUTHORIZED


def _signature_refusal(
    headers, given: str, body: bytes, secret: str, window_s: float, first_use: FirstUse
) -> tuple[int, str] | None:
    stamp = _timestamp(headers)
    if stamp is None:
        return UNAUTHORIZED
    expected = signature(secret, stamp, body)
    if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected.encode()):
        return UNAUTHORIZED
    # only now, the sender being known, does it learn what else is wrong
    if abs(time.time() - int(stamp)) > window_s:
        return 401, "timestamp outside the window"
    if not first_use(expected, int(stamp)):
        log.warning("replayed signature refused (timestamp %s)", stamp)
        return 409, "replayed signature"
    return None
