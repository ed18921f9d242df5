"""An imitation of the events endpoint on loopback: a stdlib HTTP server whose answers
each test scripts (as in the outside API review), and a worker fixture to run against it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
import redis

from capi.settings import Settings
from tests.helpers import make_settings, start_worker, stop_worker

Answer = tuple[int, dict[str, str], bytes]
OK: Answer = (200, {}, b'{"accepted_events": 0}')


@dataclass
class Request:
    validate_only: bool
    ids: list[str]
    size: int = 0  # the body's bytes


@dataclass
class Endpoint:
    """An imitation of the events endpoint; ``answer`` decides each reply."""

    answer: Callable[[Request], Answer]
    requests: list[Request] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    url: str = ""

    def sends(self) -> list[Request]:
        """The requests that were not validate_only probes."""
        return [r for r in self.requests if not r.validate_only]


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    state = Endpoint(answer=lambda r: OK)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = orjson.loads(raw)
            ids = [e["id"] for e in body["events"]]
            request = Request(bool(body.get("validate_only")), ids, len(raw))
            with lock:
                state.requests.append(request)
                status, headers, reply = state.answer(request)
                if status == 200 and not request.validate_only:
                    state.delivered += request.ids
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class Where:
    url: str


def settings_for(endpoint: Endpoint, redis_url: str, **overrides: Any) -> Settings:
    return make_settings(Where(endpoint.url), redis_url, **overrides)  # type: ignore[arg-type]


def key_state(settings: Settings) -> dict[str, str]:
    with redis.Redis.from_url(settings.redis_url, decode_responses=True) as client:
        return client.hgetall(settings.keys.for_destination("default").key_state)  # type: ignore[return-value]


@pytest.fixture
def worker() -> Iterator[Callable[[Settings], None]]:
    procs = []

    def start(settings: Settings) -> None:
        procs.append(start_worker(settings))

    yield start
    for proc in procs:
        stop_worker(proc)


def json_error(message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", **extra}})
