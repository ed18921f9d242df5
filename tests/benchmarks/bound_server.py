"""The intake benchmark's bound: the least any intake must do for a single-event request,
on ``capi serve``'s server, so that capi's figure can be read against what is reachable at
all, not only against the floor (which does no work).

Per request it does what no correct intake can skip and nothing else: find the bearer
token among the headers and compare its SHA-256 digest with the granted one, read the
body, parse it (``orjson``), check and hash the event with capi's own ``prepare()``, make
its dedup digest and its enqueue script call (capi's :data:`~capi.queue.ENQUEUE_LUA`, as
the producer sends it), send the calls of concurrent requests in one pipelined write on a
single raw Redis connection (``hiredis`` packs and parses; no connection pool, no retry, no
reconnect, no timeout), and answer each request its event's status.

It keeps none of capi's promises beyond that: no envelope or content-type checks, no
body limits, no metrics, no access log, no durability wait, no error answers (a refused
event fails its request with a 500; a lost Redis connection leaves the requests waiting on
it unanswered), and it connects to the host and port of ``CAPI_REDIS_URL`` only (no
password, no database number: the benchmark's own Redis). It is a measuring stick, never
a server to run.

    .venv/bin/python -m tests.benchmarks.bound_server PORT  (CAPI_REDIS_URL, BOUND_TOKEN)
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import hiredis
import orjson
import uvicorn

from capi import dedup
from capi.cli.intake_commands import server_options
from capi.events import prepare
from capi.intake import guard, tokens
from capi.queue import ENQUEUE_LUA, enqueue_call
from capi.settings import Settings

Message = MutableMapping[str, Any]
Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class Bound:
    """The least work per single-event request (see the module docstring)."""

    def __init__(self, settings: Settings, token: str) -> None:
        self.limits = guard.Limits.of(settings)  # the guard reads them off the app
        self.settings = settings
        self.granted = tokens.digest(token)
        self.keys = settings.keys.for_destination("default")
        self.waiting: list[Call] = []
        self.flushing = False
        self.reader = hiredis.Reader()

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await self._connect()
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value.partition(b" ")[2]
        if tokens.digest(token.decode("latin-1")) != self.granted:
            await _answer(send, 401, b'{"error":{"code":"unauthorized"}}')
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        p = prepare(orjson.loads(b"".join(chunks))["events"][0])
        keys, args = enqueue_call(
            self.keys,
            self.settings.dedup_window_s,
            [(dedup.digest(f"{p.name}:{p.id}"), p.id, p.timestamp_ms, p.json, p.mask)],
        )
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((keys, args, future))
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        flags = await future
        status = "queued" if flags[0] else "duplicate"
        body = orjson.dumps(
            {
                "results": [{"index": 0, "id": p.id, "status": status, "errors": []}],
                "queued": int(bool(flags[0])),
            }
        )
        await _answer(send, 200, body)

    async def _connect(self) -> None:
        where = urlsplit(self.settings.redis_url)
        self.r, self.w = await asyncio.open_connection(where.hostname, where.port or 6379)
        self.w.write(hiredis.pack_command(("SCRIPT", "LOAD", ENQUEUE_LUA)))
        self.sha = (await self._reply()).decode()

    async def _reply(self) -> Any:
        while (found := self.reader.gets()) is False:
            self.reader.feed(await self.r.read(65536))
        return found

    async def _flush(self) -> None:
        try:
            while self.waiting:
                group, self.waiting = self.waiting, []
                self.w.write(
                    b"".join(
                        hiredis.pack_command(("EVALSHA", self.sha, len(keys), *keys, *args))
                        for keys, args, _ in group
                    )
                )
                for _, _, future in group:
                    future.set_result(await self._reply())
        finally:
            self.flushing = False


async def _answer(send: Callable[[Message], Awaitable[None]], status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    settings = Settings(_env_file=None)
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=2048)
    config = uvicorn.Config(Bound(settings, os.environ["BOUND_TOKEN"]), **server_options(settings))
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
