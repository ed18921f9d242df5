"""The metrics and health server: loopback by default, bounded connections, and a port
already taken is one line naming the setting."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from capi.errors import ConfigError
from capi.metrics import UNDER_WAY, Metrics, serve
from capi.sandbox import SandboxThread
from tests.helpers import make_settings
from tests.test_worker_process import worker


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_binds_loopback_by_default_and_drops_idle_connections() -> None:
    server = serve(Metrics(), 0, timeout_s=0.2, max_connections=1)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            assert idle.recv(1) == b""  # closed by the server, not by our 10 s timeout
    finally:
        server.shutdown()
        server.server_close()


def test_connections_beyond_the_bound_are_closed_at_once() -> None:
    server = serve(Metrics(), 0, timeout_s=30, max_connections=1)
    port = server.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            assert first  # idle: it holds the only slot for 30 s
            with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
                assert second.recv(1) == b""
    finally:
        server.shutdown()
        server.server_close()


def test_a_taken_port_names_the_setting(taken_port: int) -> None:
    with pytest.raises(
        ConfigError, match=f"CAPI_METRICS_PORT: cannot serve metrics on 127.0.0.1:{taken_port}"
    ):
        serve(Metrics(), taken_port)


def test_worker_with_a_taken_metrics_port_exits_in_one_line(
    redis_url: str, sandbox: SandboxThread, taken_port: int
) -> None:
    proc = worker(make_settings(sandbox, redis_url), "--burst", "--metrics-port", str(taken_port))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, output
    assert "CAPI_METRICS_PORT" in output and "Traceback" not in output


def test_readiness_names_the_destinations_whose_check_waits_not_every_one_under_way() -> None:
    """A worker serving one destination while its others' startup checks are only under
    way answered /readyz "ok, but d0: key check under way, d1: ..." for every one of them
    (8 KB for 300, and on for a thousand): readiness names those that wait on something
    (an endpoint that does not answer), at most ten of them."""
    metrics = Metrics()
    metrics.redis_answered()
    metrics.for_destination("a").key_ok.set(1)
    for i in range(300):
        metrics.starting_for(f"d{i}", UNDER_WAY)
    assert metrics.ready() == (True, "ok")
    for i in range(12):
        metrics.starting_for(f"w{i}", "key check waiting for the endpoint (503)")
    ok, why = metrics.ready()
    assert ok and why.startswith("ok, but w0: key check waiting for the endpoint (503), "), why
    assert "under way" not in why and "w9:" in why and "w10:" not in why, why
    assert why.endswith("and 2 more waiting"), why
