"""A small HTTP/1.1 server for the sandbox: keep-alive, Content-Length bodies, no frills.

Written on asyncio streams rather than on an ASGI server so that a fault can commit a batch
and then drop the connection without answering, exactly the failure that makes senders
resend; and because it is fast enough never to be the bottleneck of a benchmark.

Routes: ``POST /v1/events`` (the API), ``GET /v1/conversions/events`` (read-back, see
:mod:`capi.sandbox.monitoring`), ``GET /healthz``, ``GET /_sandbox/state``,
``GET /_sandbox/received``, ``POST /_sandbox/config``, ``POST /_sandbox/reset``,
``POST /_sandbox/pixel`` (events as if the browser Pixel had sent them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from capi.sandbox.state import Reply, SandboxState

_MAX_HEADER = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024


def route(
    state: SandboxState, method: str, target: str, headers: dict[str, str], body: bytes
) -> Reply:
    """Dispatch one request to the API imitation or the control endpoints."""
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query))
    path = parts.path
    if path == "/v1/events":
        if method != "POST":
            return Reply(405, b'{"error":{"message":"Method not allowed"}}')
        return state.handle_events(query, headers, body)
    if path == "/v1/conversions/events":
        if method != "GET":
            return Reply(405, b'{"error":{"message":"Method not allowed"}}')
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        status, answer = state.monitoring.answer(query, key, state.conversion_keys)
        return Reply(status, answer)
    if path == "/_sandbox/pixel" and method == "POST":
        return _pixel(state, body)
    if path == "/healthz":
        return Reply(200, b'{"ok":true}')
    if path == "/_sandbox/state":
        return Reply(200, orjson.dumps({**state.summary(), **state.config()}))
    if path == "/_sandbox/received":
        return Reply(200, orjson.dumps(dict(state.delivered_ids())))
    if path == "/_sandbox/config" and method == "POST":
        try:
            state.configure(orjson.loads(body or b"{}"))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return Reply(400, orjson.dumps({"error": {"message": str(exc)}}))
        return Reply(200, orjson.dumps(state.config()))
    if path == "/_sandbox/reset" and method == "POST":
        state.reset()
        return Reply(200, b'{"ok":true}')
    return Reply(404, b'{"error":{"message":"Not found"}}')


def _pixel(state: SandboxState, body: bytes) -> Reply:
    """Record events as if the browser Pixel had sent them: ``{"pid", "events": [{"id",
    "type", "timestamp_ms"}]}`` (the read-back endpoint shows them as ``pixel_sdk``)."""
    try:
        payload = orjson.loads(body)
        events = [(e["type"], str(e["id"]), int(e["timestamp_ms"])) for e in payload["events"]]
        state.monitoring.record(str(payload["pid"]), events, "pixel_sdk")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return Reply(400, orjson.dumps({"error": {"message": f"bad pixel events: {exc}"}}))
    return Reply(200, orjson.dumps({"recorded": len(events)}))


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > _MAX_BODY:
        return None
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


def _encode(reply: Reply, keep_alive: bool) -> bytes:
    phrase = (
        HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else ""
    )
    lines = [
        f"HTTP/1.1 {reply.status} {phrase}",
        f"content-type: {reply.content_type}",
        f"content-length: {len(reply.body)}",
        "connection: keep-alive" if keep_alive else "connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in reply.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body


async def _serve_connection(
    state: SandboxState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                request = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                request = None
            if request is None:
                break
            method, target, headers, body = request
            reply = route(state, method, target, headers, body)
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            if reply.drop:
                break
            keep_alive = headers.get("connection", "").lower() != "close"
            writer.write(_encode(reply, keep_alive))
            await writer.drain()
            if not keep_alive:
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def start(state: SandboxState, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start serving the sandbox on host:port (0 picks a free port)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(state, reader, writer)

    asyncio.get_running_loop().set_exception_handler(_quiet_about_cancelled)
    return await asyncio.start_server(handler, host, port, limit=_MAX_HEADER, backlog=512)


def _quiet_about_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: a connection accepted as the sandbox stops has its
    handler task cancelled, and Python 3.11's stream protocol then logs that cancellation
    as an error with a traceback (in the demo's output too). Anything else is logged."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def serve(state: SandboxState, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until cancelled."""
    server = await start(state, host, port)
    async with server:
        await server.serve_forever()


class SandboxThread:
    """The sandbox served from a background thread with its own event loop (for tests)."""

    def __init__(self, state: SandboxState | None = None, host: str = "127.0.0.1", port: int = 0):
        self.state = state or SandboxState()
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="capi-sandbox", daemon=True)

    @property
    def url(self) -> str:
        """The base URL to use as CAPI_BASE_URL."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> SandboxThread:
        """Start serving and return once the port is bound."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("sandbox did not start")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await start(self.state, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
