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
  one arrives at the limit, a connection of the client address holding the most is closed
  to make room (of its connections, the one that has waited longest without a request for
  the application to answer: idle, or still sending its headers or body); only when no
  connection can be shed is the new one refused (503). A flood of idle connections
  therefore never starves ``/healthz`` or real clients: the flooding address loses its own
  connections first, and from one address alone the oldest idle ones go;
- a connection whose request was answered before its body arrived (401, 413, ...) is not
  kept to read the rest: it is closed after a short linger;
- requests sent ahead of their answers (pipelining) are parsed at most ``PIPELINE_DEPTH``
  ahead; the bytes after them wait, with reading paused, until answers go out;
- a client that reads none of the answers waiting for it for ``CAPI_INTAKE_IDLE_TIMEOUT_S``
  is disconnected (reset, so that what it left unread is freed);
- a request whose Transfer-Encoding names a coding other than chunked gets 501 (the parser
  would hand the application the coded bytes as the body).

The body's own limits (size, read time, bytes buffered across connections, event count)
are the application's (:mod:`capi.intake.app`), which reads the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from capi.settings import Settings

log = logging.getLogger("capi.intake")
# A refused connection is read (and ignored) for LINGER_S, so that a client still sending
# gets to read the answer, but at most LINGER_BYTES of it: then reading stops, and a client
# that keeps sending (an attacker) is held back by TCP, costing the server nothing.
LINGER_S = 1.0
LINGER_BYTES = 1_048_576
# Requests a connection may send ahead of their answers (HTTP pipelining) that are parsed:
# what was read beyond them waits, unparsed and with reading paused, until answers go out.
# uvicorn alone parses a whole read (up to 256 KiB: thousands of tiny requests, each held
# as a request object) and reads again after every answer, so one connection that kept
# sending grew the server by 1 GB in 12 s and held every other client's answer for seconds.
PIPELINE_DEPTH = 8
# The parser is given at least this much at a time (a body of nothing but ends of headers
# cut into a piece per request-to-be cost ten times the CPU); so at most about 60 tiny
# requests more than PIPELINE_DEPTH are parsed ahead.
FEED_MIN_BYTES = 1024
# A chunked body is parsed a chunk at a time, each a call into Python (about 0.45 us): a
# 4 MB body sent in 1-byte chunks cost 1.7 s of the event loop (0.02 s with a
# Content-Length). So a body comes in at most MIN_CHUNKS chunks (about 30 ms), or one per
# 64 bytes of CAPI_INTAKE_MAX_BODY_BYTES if that is more; and what is read of it, its chunk
# framing included, is at most twice that limit (a chunk extension that never ends held no
# body byte: it was read at 260 MB/s, a core's worth, until the body's read time ran out).
MIN_CHUNKS = 65_536


@dataclass(frozen=True, slots=True)
class Limits:
    """The guard's limits, from the settings."""

    max_header_bytes: int
    header_timeout_s: float
    idle_timeout_s: float
    max_connections: int
    max_body_bytes: int = 4_000_000

    @property
    def max_chunks(self) -> int:
        """The most chunks a chunked body may come in."""
        return max(MIN_CHUNKS, self.max_body_bytes // 64)

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits ``settings`` name."""
        return cls(
            max_header_bytes=settings.intake_max_header_bytes,
            header_timeout_s=settings.intake_header_timeout_s,
            idle_timeout_s=settings.intake_idle_timeout_s,
            max_connections=settings.intake_max_connections,
            max_body_bytes=settings.intake_max_body_bytes,
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
    ``limits`` of the :class:`~capi.intake.app.Intake`, or of the
    :class:`~capi.console.app.Console`, under any middleware)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: Limits = _limits_of(self.app)
        self._stage = HEAD
        self._since = self.loop.time()
        self._host = ""
        self._peers = _PEERS.setdefault(self.server_state, _Peers())
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes read in the HEAD stage (an end split over reads)
        self._discarded = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._held = bytearray()  # read, not parsed: requests waiting ahead fill the pipeline
        self._eof = False  # the client is done sending; answers still to go out
        self._write_timer: asyncio.TimerHandle | None = None  # answers wait for the client
        self._last_parsed: Any = None  # the request parsed whole last (uvicorn's cycle)
        self._last_word = b""  # a refusal that waits for the answers before it
        self._unsent = 0  # bytes of answers waiting, when last looked at
        self._close_after: Any = None  # the request answered 431 by _Answer (uvicorn's cycle)
        # A chunked body's last chunk: a chunk header was read and no body byte since (so
        # what follows is the trailer section until the message completes), and the bytes
        # of that section counted so far.
        self._last_chunk = False
        self._bodies = 0  # on_body calls: a read that made none held no body byte
        self._trailer_bytes = 0
        self._chunks = 0  # of the body being read
        self._body_read = 0  # bytes read while its body was (chunk framing included)
        self._heads = 0  # requests whose headers were parsed (a body's end: another begins)
        self._refusal = b""  # the answer of a request the parser was stopped for
        self._started: Any = None  # the request whose application task started last
        # The Transfer-Encoding of the request whose headers are being read (the parser
        # takes "gzip, chunked" as chunked, and would hand the application gzip bytes).
        self._codings = b""

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
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
        self.flow = _Flow(transport, self)
        self._peers.touch(self)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._peers.drop(self)
        if self.flow is None:  # refused at connection_made: uvicorn never saw it
            self.connections.discard(self)
            return
        started = self._started
        if started is not None and started is not self.cycle and not started.response_complete:
            # uvicorn tells only the request parsed last (self.cycle) that the client left;
            # with requests pipelined, the one being answered is an earlier one, which
            # wrote to the closed connection (a traceback in the log) once its answer could.
            started.disconnected = True
            started.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._started = cycle
        super()._start_asgi_task(cycle, app)

    def _shed(self) -> bool:
        """Close a connection to make room (see the module's docstring); whether there was
        one to close."""
        victim = self._peers.victim()
        if victim is None:
            return False
        self.connections.discard(victim)
        self._peers.drop(victim)
        victim._cancel_timers()
        victim._stage = CLOSING
        victim.transport.abort()
        return True

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close the connection after a linger (the client may still
        be sending: closing at once could reset the connection before it reads the answer).
        Requests sent whole before it are answered first: written at once, the refusal of
        a request sent after them was read as the answer to the first of them."""
        if answer and self._answering():
            self._last_word = answer  # written by on_response_complete
            self._stage = CLOSING
            return
        self._cancel_timers()
        self._stage = CLOSING
        self.connections.discard(self)
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.abort)

    def _answering(self) -> bool:
        """Whether a request parsed whole is still being answered (or waits its turn)."""
        return self._last_parsed is not None and not self._last_parsed.response_complete

    def send_400_response(self, msg: str) -> None:
        """What the parser cannot read gets 400, after the answers to the requests before
        it (uvicorn wrote it at once, and closed the connection)."""
        refusal = self._refusal or error_response(
            400, "Bad Request", "malformed", "not an HTTP/1.1 request"
        )
        self._refuse(refusal)

    def _cancel_timers(self) -> None:
        timers = (self._head_timer, self._linger, self.timeout_keep_alive_task, self._write_timer)
        for timer in timers:
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger = self.timeout_keep_alive_task = None
        self._write_timer = None

    # Writing

    def pause_writing(self) -> None:
        """Answers wait for the client to read them: it must read some within
        CAPI_INTAKE_IDLE_TIMEOUT_S, each time, else the connection is closed. (A request
        whose answer cannot be written is being answered: it was never shed nor timed out,
        so clients that read nothing held connections for ever, up to the limit.)"""
        super().pause_writing()
        if self._write_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(
                self.limits.idle_timeout_s, self._write_stalled
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent < self._unsent:  # the client reads, slowly: it gets another while
            self._unsent = unsent
            self._write_timer = self.loop.call_later(
                self.limits.idle_timeout_s, self._write_stalled
            )
            return
        self._stage = CLOSING
        _reset_on_close(self.transport)
        self.transport.abort()

    def _should_upgrade(self) -> bool:
        """Never: neither the intake nor the console serves WebSockets, so a request asking
        for one is answered as plain HTTP. (uvicorn would hand the connection to its
        WebSocket protocol, outside these limits, leaving this one counted among the
        address's connections for ever: 20,000 upgrade requests held 130 MB.)"""
        return False

    # Reading

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's
        """The client is done sending (a half-close): the requests it sent whole are still
        answered, then the connection is closed. (uvicorn closed it at once: a request sent
        and half-closed was queued, logged 200, and its answer never sent.)"""
        if not (self._stage == APP or self.pipeline or self._held or self._last_word):
            return None  # nothing whole to answer (or refused already): closed now
        self._eof = True
        return True

    def data_received(self, data: bytes) -> None:
        if self._held and self._stage != CLOSING:  # waits behind the requests parsed ahead
            self._held += data
            self.flow.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data``, but no more requests than fit in the pipeline beside those waiting
        (each needs its end of headers, so the parser is given up to the n-th one); the rest
        is held, reading paused, until an answer makes room (:meth:`on_response_complete`)."""
        start, size = 0, len(data)
        while start < size:
            room = PIPELINE_DEPTH - len(self.pipeline)
            if room <= 0 and self._stage != CLOSING:
                self._held += data[start:]
                self.flow.pause_reading()
                return
            end = start
            for _ in range(max(room, 1)):
                found = data.find(b"\r\n\r\n", end)
                if found < 0:
                    end = size
                    break
                end = found + 4
            end = max(end, min(start + FEED_MIN_BYTES, size))
            self._received(data if start == 0 and end == size else data[start:end])
            start = end
            if self.transport.is_closing():
                return

    def _received(self, data: bytes) -> None:
        if self._stage == CLOSING:  # refused: read and ignored until the linger ends
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES and not self.transport.is_closing():
                self.transport.pause_reading()
            return
        if self._stage in (HEAD, APP):  # APP: the bytes are the next request's head
            if self._head_timer is None and self._stage == HEAD:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_too_slow
                )
            # Measured before the parser sees it: headers that end in this read (a whole
            # request in one packet) must not get past the limit either; nor those sent
            # while the request before them is answered (they took 64 MB unchecked while
            # an answer waited for a client that did not read). The parser skips empty
            # lines before a request line, so the head starts after them.
            part = data if self._head_bytes else data.lstrip(b"\r\n")
            seen = self._head_tail + part
            end = seen.find(b"\r\n\r\n")
            head = len(part) if end < 0 else end + 4 - len(self._head_tail)
            if self._head_bytes + head > self.limits.max_header_bytes:
                self._refuse(self._too_large())
                return
            self._head_bytes += len(part)
            self._head_tail = seen[-3:]
        if self._stage == BODY:
            heads = self._heads
            if self._last_chunk:
                self._trailers_received(data)
            else:
                super().data_received(data)
            # Counted once parsed, and only when the body has not ended: a read that ends it
            # may also hold the requests pipelined behind it, which are not its framing.
            if self._stage == BODY and self._heads == heads and not self.transport.is_closing():
                self._body_read += len(data)
                if self._body_read > 2 * self.limits.max_body_bytes:
                    self._refuse(
                        self._body_too_large(
                            f"the body as sent (its chunk framing included) is over "
                            f"{2 * self.limits.max_body_bytes:,} bytes, twice "
                            "CAPI_INTAKE_MAX_BODY_BYTES"
                        )
                    )
            return
        super().data_received(data)

    def _trailers_received(self, data: bytes) -> None:
        """Bytes read after a chunked body's last chunk header: the trailer section, which
        the parser holds until each field ends (one endless field grew the process by 200
        MB, and the event loop spent 10 s concatenating it). A read that brings no body byte
        and does not end the message is all trailer; past CAPI_INTAKE_MAX_HEADER_BYTES the
        answer is 431. (The read that holds the last chunk header itself is not counted: at
        most one read more is held.)"""
        bodies = self._bodies
        super().data_received(data)
        if self._stage != BODY or self._bodies != bodies or self.transport.is_closing():
            return  # the message ended, or that chunk header was a data chunk's
        self._trailer_bytes += len(data)
        if self._trailer_bytes > self.limits.max_header_bytes:
            self._refuse(self._too_large("the trailer fields after the chunked body are"))

    @staticmethod
    def _body_too_large(message: str) -> bytes:
        return error_response(413, "Content Too Large", "body_too_large", message)

    def _too_large(self, what: str = "the request line and headers are") -> bytes:
        return error_response(
            431,
            "Request Header Fields Too Large",
            "headers_too_large",
            f"{what} over {self.limits.max_header_bytes:,} bytes (CAPI_INTAKE_MAX_HEADER_BYTES)",
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
        pipelined = self._stage != HEAD  # read behind a request still being answered
        self._heads += 1
        self._stage, self._since, self._head_bytes = BODY, self.loop.time(), 0
        self._head_tail = b""
        self._last_chunk, self._trailer_bytes = False, 0
        self._chunks = self._body_read = 0
        self._peers.touch(self)
        refusal, codings, self._codings = b"", self._codings, b""
        if pipelined and self._parsed_head_bytes() > self.limits.max_header_bytes:
            # data_received measured only the first head of its read: this one is answered
            # 431 in its turn (after the requests before it), then the connection is closed
            # after the linger (on_response_complete), like any refusal.
            refusal = self._too_large()
        elif codings:
            refusal = _unsupported_coding(codings)
        if refusal:
            app, self.app = self.app, _Answer(refusal)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            if self._close_after is None:
                self._close_after = self.cycle
            return
        super().on_headers_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        """A field of the request's headers; one after its chunked body (a trailer field) is
        read and dropped: never merged into the headers (RFC 9110 6.5.1), where it was
        believed as much as a header (an Authorization, a second X-Forwarded-For) and kept
        in memory, field after field, as long as the body's read time allowed: 1.8 GB in
        10 s from one connection."""
        if self._stage != BODY:
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                self._codings += b"," + value
            super().on_header(name, value)

    def on_chunk_header(self) -> None:
        self._last_chunk = True  # until a body byte shows it was a data chunk's
        self._chunks += 1
        if self._chunks > self.limits.max_chunks:
            self._refusal = self._body_too_large(
                f"the body came in over {self.limits.max_chunks:,} chunks; send it in "
                "fewer, larger ones (or with a Content-Length)"
            )
            raise _StopParsing  # the parser's error: answered by send_400_response

    def on_body(self, body: bytes) -> None:
        self._last_chunk = False
        self._bodies += 1
        super().on_body(body)

    def _parsed_head_bytes(self) -> int:
        """The size of the request line and headers the parser just read."""
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.parser.get_method()) + len(self.url) + 12 + fields + 2

    def on_message_complete(self) -> None:
        if self._stage == BODY:
            self._stage = APP
        super().on_message_complete()
        self._last_parsed = self.cycle

    def on_response_complete(self) -> None:
        # The request answered is the last one parsed unless others wait behind it (sent
        # ahead: pipelining); then the stage is the latest one's, which is not answered yet.
        closing = self._close_after
        if closing is not None and closing.response_complete:
            self.pipeline.clear()  # after a 431 nothing more is answered (connection: close)
        last = not self.pipeline
        answered_early = last and self._stage == BODY  # answered before its body arrived
        if last and self._stage != CLOSING:
            self._stage, self._since = HEAD, self.loop.time()
            self._peers.touch(self)
        super().on_response_complete()
        if answered_early and not self.transport.is_closing():
            self._refuse(b"")
        if self._held and self._stage != CLOSING and not self.transport.is_closing():
            held, self._held = bytes(self._held), bytearray()
            self._feed(held)  # an answer went out: parse what waited (reading stays paused
            # if the pipeline fills again)
            if not self._held and not self.transport.is_closing():
                self.flow.resume_reading()
        if self._eof and self._stage != APP and not self.pipeline and not self._held:
            self.transport.close()  # half-closed: every request sent whole is answered
        if self._last_word and not self._answering():
            word, self._last_word = self._last_word, b""
            self._refuse(word)
        if closing is not None and closing.response_complete:
            self._close_after = None
            if self._stage != CLOSING:
                self._refuse(b"")


class _Flow(FlowControl):
    """uvicorn's flow control of a connection, whose reading stays paused while bytes read
    ahead wait behind the pipeline (uvicorn resumed it whenever an application read its
    body: each pipelined POST read 256 KiB more into what waited, which grew by 40 MB in 8
    s and the process to 700 MB, from one connection)."""

    def __init__(self, transport: asyncio.Transport, conn: GuardedProtocol) -> None:
        super().__init__(transport)
        self._conn = conn

    def resume_reading(self) -> None:
        if not self._conn._held:
            super().resume_reading()


class _StopParsing(Exception):
    """Raised in a parser callback to stop parsing a request refused (:attr:`_refusal`)."""


class _Answer:
    """An ASGI application that answers every request with the status, headers and body of
    an :func:`error_response`, without reading the body; the guard closes the connection
    after it (after a linger: the ``connection: close`` is left out, since uvicorn would
    close at once)."""

    def __init__(self, answer: bytes) -> None:
        head, self.body = answer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        pairs = [tuple(line.split(b": ", 1)) for line in lines[1:]]
        self.headers = [pair for pair in pairs if pair[0] != b"connection"]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class _Peers:
    """The guarded connections of one server by client address, each address's in the
    order they last changed stage (the longest waiting first)."""

    def __init__(self) -> None:
        self.by_host: dict[str, dict[GuardedProtocol, None]] = {}

    def touch(self, conn: GuardedProtocol) -> None:
        """``conn`` changed stage just now: it goes last in its address's order."""
        conns = self.by_host.setdefault(conn._host, {})
        conns.pop(conn, None)
        conns[conn] = None

    def drop(self, conn: GuardedProtocol) -> None:
        """``conn`` is gone."""
        conns = self.by_host.get(conn._host)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.by_host[conn._host]

    def victim(self) -> GuardedProtocol | None:
        """The connection to shed: of the address holding the most connections, the one
        waiting longest without a request being answered (None if there is none)."""
        for conns in sorted(self.by_host.values(), key=len, reverse=True):
            for conn in conns:
                if conn._stage in (HEAD, BODY):
                    return conn
        return None


# One registry per server (uvicorn's ServerState), gone with it.
_PEERS: weakref.WeakKeyDictionary[Any, _Peers] = weakref.WeakKeyDictionary()


def _unsupported_coding(codings: bytes) -> bytes:
    """The 501 for a request whose Transfer-Encoding names a coding other than chunked
    (RFC 9112 6.1), or b"" if it names none: the parser takes "gzip, chunked" as chunked
    and handed the application the compressed bytes, answered 400 "not valid JSON", or 200
    with every NDJSON line refused as not JSON."""
    others = [
        c.strip()
        for c in codings.decode("latin-1").split(",")
        if c.strip().lower() not in ("", "chunked", "identity")
    ]
    if not others:
        return b""
    return error_response(
        501,
        "Not Implemented",
        "unsupported_transfer_coding",
        f"Transfer-Encoding {', '.join(others)[:40]!r} is not accepted; send the body "
        "uncompressed, with a Content-Length or chunked",
    )


def _reset_on_close(transport: asyncio.Transport) -> None:
    """Make closing ``transport`` reset the connection, discarding the answers its client
    left unread. (Closed plainly, the FIN waits behind them: the kernel kept them, 2.8 MB
    for a client that pipelined 8 large answers, probing the client's closed window, long
    after the server let the connection go.)"""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _limits_of(app: Any) -> Limits:
    """The limits of the application under any middleware uvicorn put around it."""
    for _ in range(8):
        limits = getattr(app, "limits", None)
        if isinstance(limits, Limits):
            return limits
        app = getattr(app, "app", None)
    raise TypeError("GuardedProtocol serves an application with limits (Intake, Console)")
