"""The connection guard of ``capi serve``: limits enforced before a request is parsed or
authenticated (docs/intake-security.md says why this layer and what each limit costs).

:class:`GuardedProtocol` is uvicorn's httptools protocol with these limits added, per
connection, before anything reaches the application:

- the request line and headers: at most ``CAPI_INTAKE_MAX_HEADER_BYTES`` (else 431 and
  the connection is closed), read within ``CAPI_INTAKE_HEADER_TIMEOUT_S`` of their first
  byte (else 408);
- a connection that sends nothing (before its first request or between keep-alive
  requests) is closed after ``CAPI_INTAKE_IDLE_TIMEOUT_S``;
- at most ``CAPI_INTAKE_MAX_CONNECTIONS`` connections per process, shed fairly: when a new
  one arrives at the limit, the connection that has waited longest without a request for
  the application to answer (idle, or still sending its headers or body) is closed to make
  room; only when every connection has a request being answered is the new one refused
  (503). A flood of idle connections therefore never starves ``/healthz`` or real clients;
- a connection whose request was answered before its body arrived (401, 413, ...) is not
  kept to read the rest: it is closed after a short linger.

The body's own limits (size, read time, bytes buffered across connections, event count)
are the application's (:mod:`capi.intake.app`), which reads the body.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from capi.settings import Settings

log = logging.getLogger("capi.intake")
LINGER_S = 1.0  # how long a refused connection is read (and ignored) before it is closed


@dataclass(frozen=True, slots=True)
class Limits:
    """The guard's limits, from the settings."""

    max_header_bytes: int
    header_timeout_s: float
    idle_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits ``settings`` name."""
        return cls(
            max_header_bytes=settings.intake_max_header_bytes,
            header_timeout_s=settings.intake_header_timeout_s,
            idle_timeout_s=settings.intake_idle_timeout_s,
            max_connections=settings.intake_max_connections,
        )


def error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with a JSON error body that closes the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


# The stage of a connection: HEAD (no request yet, or reading its line and headers), BODY
# (headers read, body arriving), APP (the application is answering a whole request).
HEAD, BODY, APP, CLOSING = "head", "body", "app", "closing"


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (the application holds them:
    ``limits`` of the :class:`~capi.intake.app.Intake` under any middleware)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: Limits = _limits_of(self.app)
        self._stage = HEAD
        self._since = self.loop.time()
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._shed():
            self.transport = transport
            self._refuse(
                error_response(
                    503,
                    "Service Unavailable",
                    "too_many_connections",
                    "every connection is answering a request "
                    f"(CAPI_INTAKE_MAX_CONNECTIONS={self.limits.max_connections}); try again",
                )
            )
            return
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.flow is None:  # refused at connection_made: uvicorn never saw it
            self.connections.discard(self)
            return
        super().connection_lost(exc)

    def _shed(self) -> bool:
        """Close the connection that has waited longest with no request being answered;
        whether there was one."""
        candidates = [
            c
            for c in self.connections
            if isinstance(c, GuardedProtocol) and c._stage in (HEAD, BODY)
        ]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: c._since)
        self.connections.discard(victim)
        victim._cancel_timers()
        victim._stage = CLOSING
        victim.transport.abort()
        return True

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close the connection after a linger (the client may still
        be sending: closing at once could reset the connection before it reads the answer)."""
        self._cancel_timers()
        self._stage = CLOSING
        self.connections.discard(self)
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.abort)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger, self.timeout_keep_alive_task):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger = self.timeout_keep_alive_task = None

    # Reading

    def data_received(self, data: bytes) -> None:
        if self._stage == CLOSING:
            return  # refused: read and ignored until the linger ends
        if self._stage == HEAD:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_too_slow
                )
            self._head_bytes += len(data)
        super().data_received(data)
        if self._stage == HEAD and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(
                error_response(
                    431,
                    "Request Header Fields Too Large",
                    "headers_too_large",
                    "the request line and headers are over "
                    f"{self.limits.max_header_bytes:,} bytes (CAPI_INTAKE_MAX_HEADER_BYTES)",
                )
            )

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._stage == HEAD:
            self._refuse(
                error_response(
                    408,
                    "Request Timeout",
                    "header_timeout",
                    "the request line and headers did not arrive within "
                    f"CAPI_INTAKE_HEADER_TIMEOUT_S={self.limits.header_timeout_s:g} s",
                )
            )

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._stage, self._since, self._head_bytes = BODY, self.loop.time(), 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._stage == BODY:
            self._stage = APP
        super().on_message_complete()

    def on_response_complete(self) -> None:
        answered_early = self._stage == BODY  # answered before its body arrived
        if self._stage != CLOSING:
            self._stage, self._since = HEAD, self.loop.time()
        super().on_response_complete()
        if answered_early and not self.transport.is_closing():
            self._refuse(b"")


def _limits_of(app: Any) -> Limits:
    """The limits of the application under any middleware uvicorn put around it."""
    for _ in range(8):
        limits = getattr(app, "limits", None)
        if isinstance(limits, Limits):
            return limits
        app = getattr(app, "app", None)
    raise TypeError("GuardedProtocol serves capi.intake.app.Intake only")
