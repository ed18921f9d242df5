"""The intake benchmark's floor: ``capi serve``'s server (uvicorn, httptools, uvloop, the
connection guard, the same options) in front of an ASGI app that reads the body and answers
200 with a fixed body, without Redis, validation or logging.

    .venv/bin/python -m tests.benchmarks.floor_server PORT
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from capi.cli.intake_commands import server_options
from capi.intake import guard
from capi.settings import Settings

Message = MutableMapping[str, Any]
BODY = b'{"results":[{"index":0,"status":"queued"}],"queued":1}'


class Trivial:
    """Answers every HTTP request 200 with :data:`BODY` once its body is read."""

    def __init__(self, settings: Settings) -> None:
        self.limits = guard.Limits.of(settings)  # the guard reads them off the app

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    settings = Settings(_env_file=None)
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=2048)
    config = uvicorn.Config(Trivial(settings), **server_options(settings))
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
