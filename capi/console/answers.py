"""What every console answer carries, and the small pieces the routes share: the security
headers, JSON that never reads as markup, a refusal with its status, the form reader, the
strict readers of numeric parameters and the time filter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_FORM_BYTES = 65_536
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


# The console's own script and style sheet hold nothing private: a browser may keep them,
# asking each time whether they changed (ETag: 304 when not), instead of fetching them anew
# on every page.
STATIC_HEADERS = [
    (name, b"no-cache") if name == b"cache-control" else (name, value)
    for name, value in SECURITY_HEADERS
]


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every answer (:data:`STATIC_HEADERS`
    under ``/static/``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = STATIC_HEADERS if scope["path"].startswith("/static/") else SECURITY_HEADERS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


class SafeJSON(JSONResponse):
    """JSON whose ``<``, ``>`` and ``&`` are written as ``\\u`` escapes: the same data,
    and never markup, whatever a browser makes of it."""

    def render(self, content: Any) -> bytes:
        """The body, escaped."""
        body = orjson.dumps(content).decode()
        for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            body = body.replace(char, escape)
        return body.encode()


class Refused(Exception):
    """Raised when a request may not go on; answered with its status, message and any
    extra headers (a 429's Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


_WHOLE = re.compile(r"[0-9]{1,15}")  # ASCII digits only: int() also takes '²' and '٣'
_RING_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,10}")


def whole_number(params: Mapping[str, str], name: str, default: int = 0) -> int:
    """The parameter ``name`` as a whole number (at most 15 digits), ``default`` when it is
    absent or empty; Refused 400 naming the parameter otherwise."""
    text = params.get(name, "")
    if not text:
        return default
    if not _WHOLE.fullmatch(text):
        raise Refused(400, f"{name} must be a whole number (at most 15 digits)")
    return int(text)


def ring_id(params: Mapping[str, str], name: str) -> str:
    """The parameter ``name`` as a ring entry id (``1700000000000-0``), ``0-0`` when absent;
    Refused 400 naming the parameter otherwise."""
    text = params.get(name, "") or "0-0"
    if not _RING_ID.fullmatch(text):
        raise Refused(400, f"{name} must be a ring entry id such as 1700000000000-0")
    return text


def parse_time(text: str) -> int | None:
    """A time filter (``YYYY-MM-DDTHH:MM``, UTC) as Unix ms; None when empty or unreadable."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return int(at.replace(tzinfo=at.tzinfo or UTC).timestamp() * 1000)


async def read_form(request: Request) -> dict[str, str]:
    """An url-encoded form body (the first value of each field); Refused 413 past
    :data:`MAX_FORM_BYTES`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}
