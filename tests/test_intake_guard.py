"""capi serve under attack: limits enforced before a request is parsed or authenticated,
and the operations side of its tokens (a real server process, a real Redis, raw sockets)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from capi.intake import tokens
from tests.helpers import events, wait_for
from tests.intake_helpers import TOKEN, UNSET, IntakeProcess, intake_env, start_intake
from tests.redisproc import RedisProcess
from tests.test_intake import TOKENS, queued_ids, write_destinations

EVENT = orjson.dumps({"events": events(1, prefix="legit-")})


@pytest.fixture
def guarded(tmp_path: Path, redis_url: str) -> Iterator[IntakeProcess]:
    server = start_intake(
        tmp_path,
        redis_url,
        CAPI_INTAKE_IDLE_TIMEOUT_S="1",
        CAPI_INTAKE_HEADER_TIMEOUT_S="1",
        CAPI_INTAKE_MAX_CONNECTIONS="50",
        CAPI_INTAKE_MAX_BUFFERED_BYTES="2000000",
    )
    yield server
    server.stop()


def connect(server: IntakeProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_answer(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout_s``)."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response on a keep-alive connection (head, then Content-Length bytes)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def read_responses(sock: socket.socket, n: int) -> list[bytes]:
    """``n`` whole responses on one connection (pipelined: one read may hold several)."""
    sock.settimeout(5)
    data, out = b"", []
    while len(out) < n:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            length = next(
                int(line.split(b":")[1])
                for line in data[:head_end].split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            end = head_end + 4 + length
            if len(data) >= end:
                out.append(data[:end])
                data = data[end:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return out


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (without waiting)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # with a timeout, Python would wait for data despite MSG_DONTWAIT
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False once the server has closed the connection."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def legit(server: IntakeProcess) -> int:
    return server.post(orjson.loads(EVENT)["events"], timeout=5).status_code


def peak_rss_mb(server: IntakeProcess) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_header_bomb_gets_431_and_the_server_goes_on(guarded: IntakeProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(64):  # 4 MB of one header, never finished
            if not send_quietly(sock, b"a" * 65536):
                break
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"CAPI_INTAKE_MAX_HEADER_BYTES" in answer
    assert legit(guarded) == 200


def test_headers_over_the_limit_in_one_packet_get_431_too(guarded: IntakeProcess) -> None:
    """A request line and headers over the limit that end within one read are refused as a
    trickle of them is (they were parsed and answered 200 up to about 64 KB)."""
    port = guarded.url.rsplit(":", 1)[1]
    query = "x=" + "a" * 40_000
    request = (
        f"POST /v1/events?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(EVENT)}\r\n\r\n"
    ).encode() + EVENT
    with connect(guarded) as sock:
        sock.sendall(request)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    near = b"POST /v1/events?" + b"y=" + b"b" * 15_000 + b" HTTP/1.1\r\nHost: x\r\n"
    with connect(guarded) as sock:  # under the limit, with its end split over two reads
        sock.sendall(near + b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
        sock.sendall(b"Content-Type: application/json\r\n")
        sock.sendall(b"Content-Length: %d\r\n\r" % len(EVENT))
        time.sleep(0.2)
        sock.sendall(b"\n" + EVENT)
        answer = read_answer(sock, 2.0)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert legit(guarded) == 200


def test_headers_over_the_limit_behind_empty_lines_or_another_request_get_431(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """Empty lines before a request line (the parser skips them) hid an oversized head
    from the guard's measure, and so did a request pipelined behind another in one read:
    both were answered 200. The request before a pipelined one is still answered first."""
    port = guarded.url.rsplit(":", 1)[1]

    def request(event: bytes, query: str = "") -> bytes:
        return (
            f"POST /v1/events{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(event)}\r\n\r\n"
        ).encode() + event

    big = "?x=" + "a" * 40_000
    sample = [events(1, prefix=f"pipe{i}-") for i in range(3)]
    bodies = [orjson.dumps({"events": evts}) for evts in sample]
    bodies_ids = [evts[0]["id"] for evts in sample]
    with connect(guarded) as sock:
        sock.sendall(b"\r\n\r\n" + request(bodies[0], big))
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    with connect(guarded) as sock:
        sock.sendall(request(bodies[1]) + request(bodies[2], big))
        first, second = read_responses(sock, 2)  # one read may hold both
    assert first.startswith(b"HTTP/1.1 200 "), first[:300]
    assert b'"queued":1' in first
    assert second.startswith(b"HTTP/1.1 431 "), second[:300]
    assert b"CAPI_INTAKE_MAX_HEADER_BYTES" in second
    assert queued_ids(redis_url) == [bodies_ids[1]]
    behind = [events(1, prefix="behind-")]  # sent after the refused one: never run
    with connect(guarded) as sock:
        sock.sendall(
            request(bodies[1])
            + request(bodies[2], big)
            + request(orjson.dumps({"events": behind[0]}))
        )
        answers = read_answer(sock)
    assert answers.startswith(b"HTTP/1.1 200 ") and answers.count(b"HTTP/1.1 ") == 2, answers[:600]
    assert b"HTTP/1.1 431 " in answers
    assert queued_ids(redis_url) == [bodies_ids[1]]  # its duplicate answered, "behind" not run
    assert legit(guarded) == 200


def test_a_connection_that_sends_nothing_is_closed(guarded: IntakeProcess) -> None:
    with connect(guarded) as sock:
        started = time.monotonic()
        assert read_answer(sock, timeout_s=10) == b""  # closed, without an answer
        assert time.monotonic() - started < 8


def test_an_idle_keep_alive_connection_is_closed(guarded: IntakeProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_answer(sock, timeout_s=10)
    assert answer.startswith(b"HTTP/1.1 200 ")  # answered, then closed when idle


def test_headers_that_trickle_get_408(guarded: IntakeProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and send_quietly(sock, b"X-A: b\r\n"):
            sock.settimeout(0.3)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"CAPI_INTAKE_HEADER_TIMEOUT_S" in answer


def test_a_flood_of_idle_connections_does_not_starve_health_or_clients(
    guarded: IntakeProcess, redis_url: str
) -> None:
    with ExitStack() as stack:
        for _ in range(80):  # CAPI_INTAKE_MAX_CONNECTIONS=50
            stack.enter_context(connect(guarded))
        health = httpx.get(guarded.url + "/healthz", timeout=5)
        assert health.status_code == 200
        assert legit(guarded) == 200


def test_a_parse_bomb_with_a_valid_token_stops_at_the_event_limit(
    tmp_path: Path, redis_url: str
) -> None:
    server = start_intake(tmp_path, redis_url)  # the default limits
    try:
        before = peak_rss_mb(server)
        bomb = b"x\n" * 1_999_000  # 2M bad lines, under 4 MB
        resp = server.post(content=bomb, content_type="application/x-ndjson")
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "too_many_events"
        assert peak_rss_mb(server) - before < 60  # every line parsed: ~250 MB more
        assert legit(server) == 200
    finally:
        server.stop()


def test_stalled_bodies_are_bounded_by_the_bytes_buffered(guarded: IntakeProcess) -> None:
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000000\r\n\r\n"
    ).encode()
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(guarded)) for _ in range(4)]
        for sock in socks:  # 4 x 0.9 MB held, with CAPI_INTAKE_MAX_BUFFERED_BYTES=2 MB
            sock.sendall(head + b" " * 900_000)
        assert legit(guarded) == 200  # a small request is not held up meanwhile
        answers = [read_answer(sock, timeout_s=3) for sock in socks]
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert busy and b"CAPI_INTAKE_MAX_BUFFERED_BYTES" in b"".join(busy), answers


def test_two_authorization_headers_get_400(guarded: IntakeProcess) -> None:
    resp = httpx.post(
        guarded.url + "/v1/events",
        content=EVENT,
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer wrong-token"),
            ("Authorization", f"Bearer {TOKEN}"),
        ],
    )
    assert resp.status_code == 400
    assert "Authorization" in resp.json()["error"]["message"]


def test_two_content_types_or_two_destinations_get_400_and_queue_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    """Like two Authorization headers: a proxy in front may believe the first where the
    intake would believe the last, so a request that says either twice is refused."""
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    server = start_intake(tmp_path, redis_url, CAPI_DESTINATIONS_FILE=str(path))
    both = {"Authorization": f"Bearer {TOKENS['both']}"}
    try:
        typed = httpx.post(
            server.url + "/v1/events?destination=a",
            content=EVENT,
            headers=[
                *both.items(),
                ("Content-Type", "text/plain"),
                ("Content-Type", "application/json"),
            ],
        )
        named = httpx.post(
            server.url + "/v1/events?destination=a&destination=b",
            content=EVENT,
            headers={**both, "Content-Type": "application/json"},
        )
        blank = httpx.post(  # a proxy believing the first sees no name; the intake saw b
            server.url + "/v1/events?destination=&destination=b",
            content=EVENT,
            headers={**both, "Content-Type": "application/json"},
        )
        once = server.post(events(1, prefix="once-"), token=TOKENS["both"], destination="b")
    finally:
        server.stop()
    assert typed.status_code == 400 and "Content-Type" in typed.json()["error"]["message"]
    assert named.status_code == 400 and "destination" in named.json()["error"]["message"]
    assert blank.status_code == 400 and "destination" in blank.json()["error"]["message"]
    assert once.status_code == 200
    assert queued_ids(redis_url, "a") == [] and queued_ids(redis_url, "b") == ["once-p-0"]


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path, redis_url: str
) -> None:
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    server = start_intake(tmp_path, redis_url)
    try:
        assert httpx.get(server.url + "/healthz", headers=spoof).status_code == 200
        assert httpx.get(server.url + "/metrics", headers=spoof).status_code == 200  # loopback
        log = server.stop()
    finally:
        server.stop()
    assert "203.0.113.9" not in log and '"client":"127.0.0.1:' in log

    trusting = start_intake(tmp_path, redis_url, CAPI_TRUSTED_PROXIES="127.0.0.1")
    try:
        assert httpx.get(trusting.url + "/healthz", headers=spoof).status_code == 200
        # Through the proxy the client is elsewhere: /metrics wants a token.
        refused = httpx.get(trusting.url + "/metrics", headers=spoof)
        assert refused.status_code == 403
        granted = httpx.get(
            trusting.url + "/metrics", headers={**spoof, "Authorization": f"Bearer {TOKEN}"}
        )
        assert granted.status_code == 200 and "capi_intake_requests" in granted.text
        log = trusting.stop()
    finally:
        trusting.stop()
    assert '"client":"203.0.113.9:' in log


def test_a_digest_removed_from_capi_env_is_revoked_within_seconds_and_added_back_granted(
    tmp_path: Path, redis_url: str
) -> None:
    other = "a-second-intake-token-0002"
    config = tmp_path / "capi.env"
    both = f"{tokens.digest(TOKEN)},{tokens.digest(other)}"
    config.write_text(f"CAPI_INTAKE_TOKENS_SHA256={both}\n")
    server = start_intake(
        tmp_path, redis_url, CAPI_CONFIG_FILE=str(config), CAPI_INTAKE_TOKENS_SHA256=UNSET
    )
    try:
        assert server.post(events(1), token=other).status_code == 200
        config.write_text(f"CAPI_INTAKE_TOKENS_SHA256={tokens.digest(TOKEN)}\n")
        wait_for(lambda: server.post(events(1), token=other).status_code == 401, 5, "revoke")
        assert server.post(events(1), token=TOKEN).status_code == 200
        config.write_text(f"CAPI_INTAKE_TOKENS_SHA256={both}\n")  # granted again: no restart
        wait_for(lambda: server.post(events(1), token=other).status_code == 200, 5, "grant")
    finally:
        server.stop()


def test_a_removal_that_breaks_the_destinations_file_still_revokes(
    tmp_path: Path, redis_url: str
) -> None:
    keep, drop = "a-token-that-stays-0001", "a-token-revoked-0002"
    path = tmp_path / "destinations.toml"
    table = '[destinations.a]\npixel_id = "pix_a"\napi_key_env = "K"\n'
    path.write_text(
        table + f'intake_tokens_sha256 = ["{tokens.digest(keep)}", "{tokens.digest(drop)}"]\n'
    )
    server = start_intake(tmp_path, redis_url, CAPI_DESTINATIONS_FILE=str(path))
    try:
        assert server.post(events(1), token=drop).status_code == 200
        # One edit removes a digest and leaves the list unclosed: the file does not read.
        path.write_text(table + f'intake_tokens_sha256 = ["{tokens.digest(keep)}",\n')
        wait_for(lambda: server.post(events(1), token=drop).status_code == 401, 5, "revoke")
        assert server.post(events(1), token=keep).status_code == 200
    finally:
        log = server.stop()
    assert "revoking 1 removed from it" in log and "is not valid TOML" in log


def test_a_trusted_proxy_that_is_not_an_address_is_refused_at_start(redis_url: str) -> None:
    env = intake_env(redis_url, CAPI_TRUSTED_PROXIES="10.0.0.5,proxy.internal")
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert "CAPI_TRUSTED_PROXIES" in result.stderr and "'proxy.internal'" in result.stderr


def test_a_flooding_address_loses_its_own_connections_not_another_clients(
    tmp_path: Path, redis_url: str
) -> None:
    server = start_intake(
        tmp_path, redis_url, CAPI_INTAKE_MAX_CONNECTIONS="50", CAPI_INTAKE_IDLE_TIMEOUT_S="60"
    )
    try:
        flood_from_one_address_beside_a_client(server)
    finally:
        server.stop()


def flood_from_one_address_beside_a_client(guarded: IntakeProcess) -> None:
    host, port = guarded.url.removeprefix("http://").split(":")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), 5, ("127.0.0.2", 0)) as client:
        client.sendall(request)
        assert read_response(client).startswith(b"HTTP/1.1 200 ")  # keep-alive, now idle
        with ExitStack() as stack:
            flood = [stack.enter_context(connect(guarded)) for _ in range(80)]
            # CAPI_INTAKE_MAX_CONNECTIONS=50: once the server took all 80, 30 were shed.
            wait_for(lambda: sum(map(closed, flood)) >= 30, what="the flood taken in")
            client.sendall(request)  # its connection was not the one shed
            assert read_response(client).startswith(b"HTTP/1.1 200 ")


def test_pipelined_requests_are_parsed_a_few_ahead_of_their_answers(
    guarded: IntakeProcess,
) -> None:
    """One connection that pipelines tiny requests while reading its answers must not make
    the server hoard them: uvicorn alone parsed a whole 256 KiB read into waiting requests
    after every answer (about 5 answers a second, RSS up 80 MB a second, other clients'
    answers held for seconds)."""
    n = 30_000
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    before = peak_rss_mb(guarded)
    with connect(guarded) as sock:
        answered = [0]

        def read() -> None:
            sock.settimeout(1)
            tail = b""
            deadline = time.monotonic() + 30
            while answered[0] < n and time.monotonic() < deadline:
                try:
                    chunk = sock.recv(1 << 20)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                seen = tail + chunk
                answered[0] += seen.count(b"HTTP/1.1 200 ")
                tail = seen[-12:]

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(request * n)
        started = time.monotonic()
        assert legit(guarded) == 200
        assert time.monotonic() - started < 2  # another client is not held up
        reader.join(35)
    assert answered[0] == n
    assert peak_rss_mb(guarded) - before < 30


def test_pipelined_posts_are_answered_in_order_and_queued(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """Requests parsed a few at a time (the rest waiting unparsed) keep their bodies and
    their order: small and large bodies, JSON and NDJSON, on one connection."""
    batches = [events(1 + (i % 3) * 40, start=i * 1000, prefix="piped-") for i in range(30)]
    wire = b""
    for i, batch in enumerate(batches):
        if i % 2:
            body, ctype = b"\n".join(orjson.dumps(e) for e in batch), "application/x-ndjson"
        else:
            body, ctype = orjson.dumps({"events": batch}), "application/json"
        wire += (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    with connect(guarded) as sock:
        sock.sendall(wire)
        answers = read_responses(sock, len(batches))
    for batch, answer in zip(batches, answers, strict=True):
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        results = orjson.loads(answer.partition(b"\r\n\r\n")[2])["results"]
        assert [r["id"] for r in results] == [e["id"] for e in batch]
        assert {r["status"] for r in results} == {"queued"}
    assert queued_ids(redis_url) == [e["id"] for batch in batches for e in batch]


def test_a_pipelined_request_whose_body_is_still_arriving_is_answered(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """The answer to a request must not close the connection because the request sent
    after it is still sending its body (the guard took that for "answered before its body
    arrived" and closed the connection: the second request was never answered)."""
    first, second = events(1, prefix="ahead-"), events(1, start=1, prefix="ahead-")

    def post(batch: list[dict[str, Any]]) -> tuple[bytes, bytes]:
        body = orjson.dumps({"events": batch})
        head = (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head, body

    head_1, body_1 = post(first)
    head_2, body_2 = post(second)
    with connect(guarded) as sock:
        sock.sendall(head_1 + body_1 + head_2 + body_2[:10])
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.2)
        sock.sendall(body_2[10:])
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert queued_ids(redis_url) == [first[0]["id"], second[0]["id"]]


def test_a_websocket_upgrade_is_answered_as_plain_http_and_holds_nothing(
    guarded: IntakeProcess,
) -> None:
    """The intake serves no WebSocket: a handshake must not hand the connection to
    uvicorn's WebSocket protocol (outside the guard's limits; the guarded protocol it left
    was never dropped from its address's connections: about 6.6 KB held per request, and
    a 500 with an error logged each time)."""
    handshake = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with connect(guarded) as sock:
        sock.sendall(handshake)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    before = peak_rss_mb(guarded)
    for _ in range(5_000):
        with connect(guarded) as sock:
            sock.sendall(handshake)
            sock.recv(65536)
    assert peak_rss_mb(guarded) - before < 15  # before: +33 MB
    assert "without completing handshake" not in guarded.log()


def test_a_request_sent_whole_then_half_closed_is_answered(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """A client may shut down its sending side once its request is sent (``nc -N``,
    ``socat``): its events were queued and logged 200, but the connection was closed
    before the answer went out. Requests pipelined ahead of the half-close are answered
    too, then the connection is closed; one half-closed idle is closed at once."""
    batches = [events(1, start=i, prefix="half-") for i in range(3)]
    wire = b""
    for batch in batches:
        body = orjson.dumps({"events": batch})
        wire += (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    with connect(guarded) as sock:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        answers = read_answer(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 3, answers[:300]
    assert queued_ids(redis_url) == [b[0]["id"] for b in batches]
    with connect(guarded) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert read_answer(sock, timeout_s=2) == b""


def test_headers_sent_while_the_request_before_them_is_answered_are_limited_too(
    tmp_path: Path,
) -> None:
    """The header limit held only between requests: a head sent while the request before
    it was being answered (here: Redis frozen; or an answer waiting for a client that does
    not read) went to the parser unchecked (64 MB taken, copied over and over)."""
    with RedisProcess(tmp_path) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_REDIS_TIMEOUT_S="3")
        try:
            assert legit(server) == 200  # connected before the freeze
            body = orjson.dumps({"events": events(1, prefix="slow-")})
            first = (
                f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            rp.freeze()
            with connect(server) as sock:
                sock.sendall(first)
                time.sleep(0.5)  # the first request waits for Redis
                send_quietly(sock, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 200_000)
                send_quietly(sock, b"\r\n\r\n")
                rp.thaw()
                answers = read_answer(sock)
            assert answers.startswith(b"HTTP/1.1 200 "), answers[:300]  # the first's
            assert b"HTTP/1.1 431 " in answers, answers[:300]
            assert b'"status": "alive"' not in answers
        finally:
            rp.thaw()
            server.stop()


def _large_answers(n: int) -> bytes:
    """``n`` pipelined requests of 1,000 refused events: about 570 KB of answer each."""
    body = orjson.dumps({"events": [{"type": 7, "user": {"country": 1, "city": 8}}] * 1000})
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return (head + body) * n


def test_clients_that_read_none_of_their_answers_do_not_hold_connections(
    tmp_path: Path, redis_url: str
) -> None:
    """A request whose answer waits for a client that reads nothing was being answered for
    ever: never shed, never timed out, so a few such clients held every connection and
    the rest got 503. Now the connection goes once nothing is read for
    CAPI_INTAKE_IDLE_TIMEOUT_S; a client that reads slowly keeps it."""
    server = start_intake(
        tmp_path,
        redis_url,
        CAPI_INTAKE_MAX_CONNECTIONS="3",
        CAPI_INTAKE_IDLE_TIMEOUT_S="1",
    )
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with ExitStack() as stack:
            for _ in range(3):
                sock = stack.enter_context(socket.socket())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((host, int(port)))
                sock.sendall(_large_answers(8))
            seen, still_since = -1, time.monotonic()
            while time.monotonic() - still_since < 3:  # until answers stop going out
                answered = server.log().count("POST /v1/events 200")
                if answered != seen:
                    seen, still_since = answered, time.monotonic()
                time.sleep(0.1)
            assert legit(server) == 200
        with connect(server) as slow:
            slow.sendall(_large_answers(4))
            got = b""
            slow.settimeout(5)
            while got.count(b"HTTP/1.1 200 ") < 4 or not got.endswith(b"}"):
                chunk = slow.recv(65536)
                assert chunk, f"closed after {len(got):,} bytes"
                got += chunk
                time.sleep(0.05)  # about 1 MB/s: slow, never stalled for a second
    finally:
        server.stop()


def reads_nothing(server: IntakeProcess) -> socket.socket:
    """A connection that sent 8 requests with large answers and reads none of them."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(_large_answers(8))
    return sock


def reset(sock: socket.socket) -> bool:
    """Whether the server reset ``sock`` (a close that sent a FIN does not count)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


def test_a_client_that_reads_nothing_is_reset_so_its_unread_answers_are_freed(
    guarded: IntakeProcess,
) -> None:
    """A connection dropped because its client read nothing was closed with a FIN queued
    behind megabytes of unread answers: the kernel kept them (2.8 MB for this client),
    probing the client's closed window, long after the server let the connection go. A
    reset discards them."""
    with reads_nothing(guarded) as sock:
        wait_for(lambda: reset(sock), what="the server to reset the client that reads nothing")
    assert legit(guarded) == 200


def test_a_pipelining_client_dropped_while_its_answers_wait_leaves_no_traceback(
    tmp_path: Path, redis_url: str
) -> None:
    """When the client above is dropped, the request being answered wrote to the closed
    connection, and the log said "Exception in ASGI application" with a traceback: uvicorn
    marks only the request parsed last as disconnected, and with pipelining that is not the
    one being answered."""
    server = start_intake(tmp_path, redis_url, CAPI_INTAKE_IDLE_TIMEOUT_S="1")
    try:
        with reads_nothing(server) as sock:
            wait_for(lambda: reset(sock), what="the server to reset the client")
        assert legit(server) == 200
    finally:
        log = server.stop()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_a_refusal_of_a_request_sent_after_others_comes_after_their_answers(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """Bytes the parser cannot read, sent after a request whose events are being queued:
    the 400 was written at once, so the client read it as the answer to the first request
    (queued all the same). The first is answered first (a head over the limit, likewise:
    test_headers_sent_while_the_request_before_them_is_answered_are_limited_too)."""
    for i, after in enumerate(
        [b"BLAH\x00 / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX\x01: y\r\n\r\n"]
    ):
        batch = events(1, start=i, prefix="first-")
        body = orjson.dumps({"events": batch})
        first = (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with connect(guarded) as sock:
            sock.sendall(first + after)
            answers = read_answer(sock)
        assert answers.startswith(b"HTTP/1.1 200 "), answers[:200]
        assert b"HTTP/1.1 400 " in answers, answers[-300:]
        assert queued_ids(redis_url)[-1] == batch[0]["id"]


def cpu_s(server: IntakeProcess) -> float:
    """The server process's CPU time so far."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_body_of_ends_of_headers_costs_no_more_than_any_body(
    tmp_path: Path, redis_url: str
) -> None:
    """Pipelined requests are counted by their ends of headers, but a body can hold
    nothing else: cut into a piece per one, 3.8 MB of them cost 0.2 s of CPU (0.02 s as
    one body)."""
    server = start_intake(tmp_path, redis_url)  # the default limits
    try:
        body = b"\r\n\r\n" * 950_000
        head = (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        before = cpu_s(server)
        with connect(server) as sock:
            sock.sendall(head + body)
            assert read_response(sock).startswith(b"HTTP/1.1 400 ")
        assert cpu_s(server) - before < 0.1
    finally:
        server.stop()


def test_events_with_hundreds_of_unknown_keys_cost_no_more_than_their_parse(
    tmp_path: Path, redis_url: str
) -> None:
    """A token holder's 4 MB of 1,000 events with 450 unknown keys each: every unknown key
    was given its rule (the allowed fields listed), though an answer names 20 problems an
    event: 3.7 s of the server's CPU, the event loop held all along (0.9 s now: the rest
    are only counted)."""
    server = start_intake(tmp_path, redis_url)  # the default limits
    try:
        event = {"id": "wide", **{f"k{i}": 0 for i in range(450)}}
        body = orjson.dumps({"events": [event] * 1000})
        before = cpu_s(server)
        resp = server.post(content=body)
        spent = cpu_s(server) - before
        assert resp.status_code == 200 and resp.json()["refused"] == 1000
        (last,) = resp.json()["results"][-1]["errors"][-1:]
        assert last == {"field": "(event)", "rule": "and 433 more problems"}
        assert spent < 1.8, spent
        assert legit(server) == 200
    finally:
        server.stop()


def chunked_post(body: bytes, *, token: str | None = TOKEN) -> bytes:
    """The head and the one data chunk of a chunked POST /v1/events, up to its last chunk
    header ("0\\r\\n": the trailer section comes next)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n"
        ).encode()
        + body
        + b"\r\n0\r\n"
    )


def test_a_trailer_field_is_not_taken_as_a_header(guarded: IntakeProcess, redis_url: str) -> None:
    """Fields after a chunked body (trailers) are not the request's headers: one named
    Authorization granted nothing (it was believed, and the event queued)."""
    with connect(guarded) as sock:
        sock.sendall(
            chunked_post(EVENT, token=None) + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert queued_ids(redis_url) == []
    with connect(guarded) as sock:  # a client's own small trailers are still read past
        sock.sendall(chunked_post(EVENT) + b"X-Checksum: 1\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    assert queued_ids(redis_url) == ["legit-p-0"]


@pytest.mark.parametrize("field", [b"X-Long: ", b"X-Many: 1\r\n"], ids=["one field", "many"])
def test_trailers_that_go_on_get_431_and_hold_nothing(guarded: IntakeProcess, field: bytes) -> None:
    """A trailer section is limited as headers are: with a valid token, one that went on
    (a field never finished, or field after field) was kept until the body's read time
    ran out, 10 s later: 200 MB to 1.8 GB from one connection."""
    rss_before = peak_rss_mb(guarded)
    with connect(guarded) as sock:
        sock.sendall(chunked_post(EVENT) + field)
        unit = (b"a" if field.endswith(b": ") else field) * 4096
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and send_quietly(sock, unit * 16):
            pass
        answer = read_answer(sock, timeout_s=1)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"trailer fields" in answer
    assert peak_rss_mb(guarded) - rss_before < 20
    assert legit(guarded) == 200


def cpu_s_of(server: IntakeProcess) -> float:
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_until_answered(sock: socket.socket, pieces: Iterator[bytes], timeout_s: float) -> bytes:
    """Send ``pieces`` until the server answers (or ``timeout_s``); what it answered. (Never
    blocked in a send: a server that stops reading a refused request resets the connection
    a second later, and the reset discards an answer not read by then.)"""
    answer, pending = b"", b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock], [], 0.1)
        if readable:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        elif writable:
            pending = pending or next(pieces, b"")
            try:
                pending = pending[sock.send(pending, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                pass
            except OSError:
                break
    return answer


def chunked(body: bytes, size: int) -> bytes:
    """``body`` as chunks of ``size`` bytes, and the last chunk."""
    pieces = (body[i : i + size] for i in range(0, len(body), size))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_body_in_tiny_chunks_gets_413_without_costing_the_server_seconds(
    guarded: IntakeProcess, redis_url: str
) -> None:
    """Each chunk of a chunked body costs a call into Python: 3.9 MB in 1-byte chunks took
    1.7 s of the event loop (and was answered 200). Past 65,536 chunks the answer is 413; a
    body sent as one chunk per event is read as before."""
    head = chunked_post(b"", token=TOKEN).removesuffix(b"0\r\n\r\n0\r\n")
    before = cpu_s_of(guarded)
    wire = head + chunked(b'{"events":[' + b" " * 1_900_000 + b"]}", 1)
    with connect(guarded) as sock:
        pieces = (wire[i : i + 65536] for i in range(0, len(wire), 65536))
        answer = send_until_answered(sock, pieces, timeout_s=10)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"65,536 chunks" in answer
    assert cpu_s_of(guarded) - before < 0.5
    lines = [orjson.dumps(e) + b"\n" for e in events(1000, prefix="chunk-")]
    ndjson = head.replace(b"application/json", b"application/x-ndjson")
    with connect(guarded) as sock:
        sock.sendall(ndjson + b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in lines) + b"0\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    assert len(queued_ids(redis_url)) == 1000


def test_a_chunk_extension_that_never_ends_gets_413(guarded: IntakeProcess) -> None:
    """Chunk framing holds no body byte, so the body limit never counted it: one chunk
    extension that went on was read, a core's worth, until the body's read time ran out.
    What is read of a body, its framing included, is at most twice the body limit."""
    head = chunked_post(b"", token=TOKEN).removesuffix(b"0\r\n\r\n0\r\n")
    with connect(guarded) as sock:
        sock.sendall(head + b"1;name=")
        answer = send_until_answered(sock, itertools.repeat(b"v" * 65536), timeout_s=5)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"chunk framing" in answer
    assert legit(guarded) == 200


def test_pipelined_posts_do_not_pile_up_unparsed_bytes(guarded: IntakeProcess) -> None:
    """Bytes read ahead of the pipeline wait unread: an application reading its body
    resumed reading, so each pipelined POST answered read 256 KiB more into what waited
    (one connection sending POSTs ahead, reading its answers, grew the process by 150 MB
    in 8 s; by 650 MB when it read none)."""
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(EVENT)}\r\n\r\n"
    ).encode()
    burst = (head + EVENT) * 50
    rss_before = peak_rss_mb(guarded)
    answers = b""
    with connect(guarded) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.send(burst)
            with contextlib.suppress(BlockingIOError):
                answers += sock.recv(1 << 20)
            time.sleep(0.001)
    assert answers.startswith(b"HTTP/1.1 200 ")
    assert peak_rss_mb(guarded) - rss_before < 30
    assert legit(guarded) == 200


@pytest.mark.parametrize("path", ["/%6Detrics", "/metric%73", "/v1%2Fevents"])
def test_a_percent_encoded_route_is_not_the_route(guarded: IntakeProcess, path: str) -> None:
    """Routes are matched as sent: "/%6Detrics" was /metrics once decoded, so a proxy on
    this host that keeps /metrics off its routes by the path as sent (HAProxy's path_beg,
    Envoy's prefix, neither decoding by default) passed it, and every client was local."""
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(EVENT)}\r\n\r\n".encode()
            + EVENT
            if "events" in path
            else f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert b"capi_intake" not in answer


def test_a_body_whose_end_comes_with_pipelined_requests_is_not_over_twice_the_limit(
    tmp_path: Path, redis_url: str
) -> None:
    """The read that ends a body may hold the requests pipelined behind it: they are not
    its framing. Counted as the body's, a 1,500-byte body (limit 2,000) whose last bytes
    came with five more requests was answered 413 "over 4,000 bytes", and so was each."""
    server = start_intake(tmp_path, redis_url, CAPI_INTAKE_MAX_BODY_BYTES="2000")
    try:
        bodies = [orjson.dumps({"events": events(1, start=i, prefix="pp-")}) for i in range(6)]
        posts = [
            (
                f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 1500\r\n\r\n"
            ).encode()
            + body.ljust(1500)
            for body in bodies
        ]
        with connect(server) as sock:
            sock.sendall(posts[0][:-700])  # its body begins
            time.sleep(0.5)  # (read on its own)
            sock.sendall(posts[0][-700:] + b"".join(posts[1:]))
            answers = read_responses(sock, 6)
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 6, answers
        assert len(queued_ids(redis_url)) == 6
    finally:
        server.stop()
