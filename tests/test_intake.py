"""capi serve: a real server process, a real Redis, a real HTTP client (httpx)."""

from __future__ import annotations

import copy
import gzip
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import redis
from openapi_spec_validator import validate as validate_spec

from capi.events import purchase, signup
from capi.intake import tokens
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.helpers import (
    capi,
    events,
    http_get,
    make_settings,
    read_http_answer,
    redis_dump,
    start_worker,
    stop_worker,
    wait_for,
)
from tests.intake_helpers import TOKEN, IntakeProcess, intake_env, start_intake
from tests.redisproc import RedisProcess

SECRET_EMAIL = "ada.lovelace.secret@example.com"


@pytest.fixture
def intake(tmp_path: Path, redis_url: str) -> Iterator[IntakeProcess]:
    server = start_intake(tmp_path, redis_url)
    yield server
    server.stop()


def queued_ids(redis_url: str, destination: str = "default") -> list[str]:
    """The ids of the events in a destination's stream, in order."""
    keys = Settings(_env_file=None, redis_url=redis_url).keys.for_destination(destination)
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(keys.stream)
    return [orjson.loads(fields[b"e"])["id"] for _, fields in entries]


def mixed_batch() -> list[Any]:
    good = events(3, prefix="mix-")
    broken = purchase("bad-amount", amount=1299, currency="USD", email=SECRET_EMAIL)
    broken["data"]["amount"] = "12.99"
    return [
        good[0],
        broken,
        good[1],
        copy.deepcopy(good[0]),  # the same id again: a duplicate
        42,
        {"id": "no-type"},
        good[2],
    ]


def test_a_mixed_batch_is_answered_per_event_and_only_good_events_are_delivered(
    tmp_path: Path, redis_url: str, sandbox: SandboxThread
) -> None:
    server = start_intake(tmp_path, redis_url)
    batch = mixed_batch()
    resp = server.post(batch)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert [r["status"] for r in answer["results"]] == [
        "queued",
        "refused",
        "queued",
        "duplicate",
        "refused",
        "refused",
        "queued",
    ]
    assert [r["index"] for r in answer["results"]] == list(range(7))
    assert answer["results"][1] == {
        "index": 1,
        "id": "bad-amount",
        "status": "refused",
        "errors": [{"field": "data.amount", "rule": answer["results"][1]["errors"][0]["rule"]}],
        "warnings": [],
    }
    assert "integer" in answer["results"][1]["errors"][0]["rule"]
    assert answer["results"][4]["errors"][0]["field"] == "(event)"
    assert answer["results"][4]["id"] is None
    assert {e["field"] for e in answer["results"][5]["errors"]} >= {"type", "timestamp_ms"}
    assert (answer["queued"], answer["duplicates"], answer["refused"]) == (3, 1, 3)
    good = ["mix-p-0", "mix-s-1", "mix-p-2"]
    assert queued_ids(redis_url) == good

    worker = start_worker(make_settings(sandbox, redis_url))
    try:
        wait_for(lambda: set(sandbox.state.delivered_ids()) == set(good), what="delivery")
    finally:
        stop_worker(worker)
    assert dict(sandbox.state.delivered_ids()) == dict.fromkeys(good, 1)
    server.stop()


def test_ndjson_answers_each_line_and_a_broken_line_spoils_no_neighbour(
    intake: IntakeProcess, redis_url: str
) -> None:
    good = events(2, prefix="nd-")
    body = orjson.dumps(good[0]) + b"\n{not json\n\n" + orjson.dumps(good[1]) + b"\n"
    resp = intake.post(content=body, content_type="application/x-ndjson")
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["status"] for r in results] == ["queued", "refused", "queued"]
    assert results[1]["errors"] == [{"field": "(event)", "rule": "line 2 is not valid JSON"}]
    assert queued_ids(redis_url) == ["nd-p-0", "nd-s-1"]


def test_an_empty_json_body_is_called_empty(intake: IntakeProcess) -> None:
    """It was answered 'not valid JSON (line 1, column 1)', which sends a reader looking
    for a typo in a body that never left the client."""
    resp = intake.post(content=b"", content_type="application/json")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == (
        'the body is empty; send a JSON object {"events": [...]}'
    )


def test_a_pretty_printed_json_body_sent_as_ndjson_says_so(
    intake: IntakeProcess, redis_url: str
) -> None:
    """An indented JSON document posted as NDJSON had each of its lines refused as 'not
    valid JSON', with no word of why; nothing in it is queued either way."""
    body = orjson.dumps({"events": events(2, prefix="pp-")}, option=orjson.OPT_INDENT_2)
    resp = intake.post(content=body, content_type="application/x-ndjson")
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "one JSON value over several lines" in message
    assert "Content-Type: application/json" in message
    assert queued_ids(redis_url) == []


def test_a_pretty_printed_body_of_more_lines_than_events_allowed_is_not_too_many_events(
    intake: IntakeProcess, redis_url: str
) -> None:
    """100 events indented as one JSON document and posted as NDJSON are over 1,000 lines:
    the answer was 413 'the body holds more than 1,000 events' (each line counted as an
    event), which sends the client to split a body that is not too large."""
    body = orjson.dumps({"events": events(100, prefix="pp-")}, option=orjson.OPT_INDENT_2)
    assert body.count(b"\n") > 1000
    resp = intake.post(content=body, content_type="application/x-ndjson")
    assert resp.status_code == 400, resp.text
    assert "one JSON value over several lines" in resp.json()["error"]["message"]
    assert queued_ids(redis_url) == []


@pytest.mark.parametrize("kind", ["application/json", "application/x-ndjson"])
def test_a_body_that_starts_with_a_byte_order_mark_is_read_as_capi_enqueue_reads_it(
    intake: IntakeProcess, redis_url: str, kind: str
) -> None:
    """A file saved by a Windows editor (UTF-8 with its signature) and posted as is:
    capi enqueue reads it, the intake answered 400 (JSON) or refused its first line."""
    good = events(2, prefix="bom-")
    if kind == "application/json":
        body = orjson.dumps({"events": good})
    else:
        body = b"\n".join(orjson.dumps(e) for e in good) + b"\n"
    resp = intake.post(content=b"\xef\xbb\xbf" + body, content_type=kind)
    assert resp.status_code == 200, resp.text
    assert [r["status"] for r in resp.json()["results"]] == ["queued", "queued"]
    assert queued_ids(redis_url) == ["bom-p-0", "bom-s-1"]


DESTINATIONS = """
[destinations.a]
pixel_id = "pix_a"
api_key_env = "CAPI_KEY_A"
intake_tokens_sha256 = ["{a}", "{both}"]

[destinations.b]
pixel_id = "pix_b"
api_key_env = "CAPI_KEY_B"
intake_tokens_sha256 = ["{b}", "{both}"]
"""
TOKENS = {"a": "token-granting-a-0001", "b": "token-granting-b-0002", "both": "token-ab-03"}


def write_destinations(path: Path, **names: str) -> None:
    digests = {n: tokens.digest(t) for n, t in TOKENS.items()}
    digests.update({n: tokens.digest(t) for n, t in names.items()})
    path.write_text(DESTINATIONS.format(**digests))


def test_a_token_queues_only_for_the_destinations_it_grants(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    server = start_intake(tmp_path, redis_url, CAPI_DESTINATIONS_FILE=str(path))
    try:
        denied = server.post(events(2, prefix="x-"), token=TOKENS["a"], destination="b")
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "destination_not_granted"
        assert queued_ids(redis_url, "b") == [] and queued_ids(redis_url, "a") == []

        only = server.post(events(1, prefix="a-"), token=TOKENS["a"])  # grants one: implied
        assert only.status_code == 200 and only.json()["queued"] == 1
        assert queued_ids(redis_url, "a") == ["a-p-0"]

        several = server.post(events(1, prefix="ab-"), token=TOKENS["both"])
        assert several.status_code == 403
        assert "?destination=NAME: a, b" in several.json()["error"]["message"]
        named = server.post(events(1, prefix="ab-"), token=TOKENS["both"], destination="b")
        assert named.status_code == 200 and queued_ids(redis_url, "b") == ["ab-p-0"]
    finally:
        server.stop()


def test_a_token_granting_many_destinations_is_answered_with_a_few_names_and_a_count(
    tmp_path: Path, redis_url: str
) -> None:
    """With 3,000 destinations granted to one token, the 403 that asks for one and the
    startup line listed every name (about 20 KB each); 25 show it here."""
    path = tmp_path / "destinations.toml"
    digest = tokens.digest(TOKENS["both"])
    path.write_text(
        "".join(
            f'[destinations.d{i:02}]\npixel_id = "pix_{i}"\napi_key_env = "CAPI_KEY_A"\n'
            f'intake_tokens_sha256 = ["{digest}"]\n'
            for i in range(25)
        )
    )
    server = start_intake(tmp_path, redis_url, CAPI_DESTINATIONS_FILE=str(path))
    try:
        answer = server.post(events(1), token=TOKENS["both"])
        assert answer.status_code == 403
        message = answer.json()["error"]["message"]
        assert message.endswith(
            "?destination=NAME: " + ", ".join(f"d{i:02}" for i in range(10)) + " and 15 more"
        ), message
        (startup,) = [line for line in server.log().splitlines() if "capi serve on" in line]
        assert startup.endswith("d08, d09 and 15 more)"), startup
    finally:
        server.stop()


def test_tokens_follow_the_destinations_file(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    server = start_intake(tmp_path, redis_url, CAPI_DESTINATIONS_FILE=str(path))
    try:
        new = "a-token-added-later-0004"
        assert server.post(events(1), token=new).status_code == 401
        write_destinations(path, a=new)  # a's first token replaced by the new one
        wait_for(lambda: server.post(events(1), token=new).status_code == 200, what="reload")
        assert server.post(events(1), token=TOKENS["a"]).status_code == 401  # revoked
        # Broken, the digest still in it: its grant stays (a removed one would be revoked).
        path.write_text(f'[destinations.a]\nintake_tokens_sha256 = ["{tokens.digest(new)}"')
        until = time.monotonic() + 1.5  # past the next look at the file (once a second)
        while time.monotonic() < until:
            assert server.post(events(1), token=new).status_code == 200
    finally:
        server.stop()


def test_env_tokens_beside_a_destinations_file_are_said_to_grant_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    settings = Settings(
        _env_file=None, destinations_file=path, intake_tokens_sha256=tokens.digest("old-0001")
    )
    with caplog.at_level(logging.WARNING, logger="capi.intake"):
        grants = tokens.read_grants(settings)
    assert tokens.digest("old-0001") not in grants
    assert "CAPI_INTAKE_TOKENS_SHA256 grants nothing while a destinations file" in caplog.text
    caplog.clear()
    tokens.read_grants(Settings(_env_file=None, destinations_file=path))
    assert "CAPI_INTAKE_TOKENS_SHA256" not in caplog.text
    path.write_text('[destinations.a]\npixel_id = "pix_a"\napi_key_env = "CAPI_KEY_A"\n')
    refused = capi(settings, "serve", "--port", "0")  # its only grant is the ignored one
    assert refused.returncode == 3
    assert f"no intake token is granted in the destinations file {path}" in refused.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_capi_serve_says_once_that_env_tokens_grant_nothing(
    tmp_path: Path, redis_url: str, processes: int
) -> None:
    """The warning came twice at start: from the command's check that some token is
    granted, and from the intake reading its grants; with --workers 2, once from each
    server process."""
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    server = start_intake(
        tmp_path, redis_url, "--workers", str(processes), CAPI_DESTINATIONS_FILE=str(path)
    )
    wait_for(
        lambda: server.log().count("Application startup complete") == processes,
        what="every server process to start",
    )
    assert server.post(events(1, prefix="a-"), token=TOKENS["a"]).status_code == 200
    said = server.stop()
    assert said.count("CAPI_INTAKE_TOKENS_SHA256 grants nothing") == 1, said


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", "Basic " + TOKEN, "Bearer", TOKEN, "Bearer sk-conv-key-0001"],
)
def test_no_or_a_wrong_token_gets_401_and_nothing_is_queued(
    intake: IntakeProcess, redis_url: str, header: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Authorization"] = header
    resp = httpx.post(
        intake.url + "/v1/events",
        content=orjson.dumps({"events": events(3)}),
        headers=headers,
    )
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "unauthorized"
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_a_conversion_key_sent_as_the_intake_token_is_told_apart(intake: IntakeProcess) -> None:
    """A newcomer's client sends the Conversion Key it has (not an intake token): 'the
    intake token is not configured' did not say which token it wanted."""
    resp = httpx.post(
        intake.url + "/v1/events",
        content=orjson.dumps({"events": events(1)}),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-conv-key-0001"},
    )
    assert resp.status_code == 401
    message = resp.json()["error"]["message"]
    assert "Conversion Key" in message and "capi intake-token" in message
    assert "sk-conv-key-0001" not in resp.text


def test_an_over_size_body_gets_413(tmp_path: Path, redis_url: str) -> None:
    server = start_intake(
        tmp_path, redis_url, CAPI_INTAKE_MAX_BODY_BYTES="20000", CAPI_INTAKE_MAX_EVENTS="50"
    )
    try:
        big = server.post(events(100))  # ~30 kB, with a Content-Length
        assert big.status_code == 413
        assert "CAPI_INTAKE_MAX_BODY_BYTES" in big.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while reading
            yield b'{"events": ['
            for _ in range(200):
                yield orjson.dumps(events(1)[0]) + b","
            yield b"1]}"

        streamed = httpx.post(
            server.url + "/v1/events",
            content=chunks(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        many = server.post([{}] * 51)
        assert many.status_code == 413 and "at most 50" in many.json()["error"]["message"]
        assert queued_ids(redis_url) == []
    finally:
        server.stop()


def test_a_body_that_never_finishes_gets_408_and_the_server_goes_on(
    tmp_path: Path, redis_url: str
) -> None:
    """A client that sends its headers and part of a body, then stalls, is answered 408
    once CAPI_INTAKE_READ_TIMEOUT_S has passed, not held until shutdown."""
    server = start_intake(tmp_path, redis_url, CAPI_INTAKE_READ_TIMEOUT_S="1")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {TOKEN}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                + b'{"events": ['
            )
            started = time.monotonic()
            answer = read_http_answer(conn)
            waited = time.monotonic() - started
            while chunk := conn.recv(65536):  # the rest, until the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"CAPI_INTAKE_READ_TIMEOUT_S" in answer
        assert 0.5 < waited < 5
        assert server.post(events(1)).status_code == 200  # the server goes on
        assert len(queued_ids(redis_url)) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", ""])
def test_a_wrong_content_type_gets_415(intake: IntakeProcess, content_type: str) -> None:
    resp = intake.post(events(1), content_type=content_type)
    assert resp.status_code == 415
    message = resp.json()["error"]["message"]
    assert "application/x-ndjson" in message
    if not content_type:  # it said "Content-Type none is not accepted"
        assert message.startswith("the request has no Content-Type; send"), message


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_a_compressed_body_gets_415_and_queues_nothing(
    intake: IntakeProcess, redis_url: str, content_type: str
) -> None:
    """A Content-Encoding the intake does not decode (it decodes none) is said so: a gzip
    body was read as JSON, answered 400 "not valid JSON", or 200 with every NDJSON line
    refused as not JSON."""
    body = b"".join(orjson.dumps(e) + b"\n" for e in events(2))
    if content_type == "application/json":
        body = orjson.dumps({"events": events(2)})
    resp = httpx.post(
        intake.url + "/v1/events",
        content=gzip.compress(body),
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": content_type,
            "Content-Encoding": "gzip",
        },
    )
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["code"] == "unsupported_content_encoding"
    assert resp.headers["accept-encoding"] == "identity"
    assert queued_ids(redis_url) == []
    plain = httpx.post(  # identity is no coding
        intake.url + "/v1/events",
        content=body,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": content_type,
            "Content-Encoding": "identity",
        },
    )
    assert plain.status_code == 200, plain.text
    assert len(queued_ids(redis_url)) == 2


@pytest.mark.parametrize("coding", ["gzip, chunked", "x-custom, chunked"])
def test_a_transfer_coding_other_than_chunked_gets_501_and_queues_nothing(
    intake: IntakeProcess, redis_url: str, coding: str
) -> None:
    """The parser takes "gzip, chunked" as chunked, and the application was handed the
    gzip bytes as they came: 200 with every NDJSON line refused as not JSON (or 400 "not
    valid JSON"), where a Content-Encoding is said so (415). RFC 9112 6.1: 501."""
    body = gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in events(2)))
    host, port = intake.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            (
                f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/x-ndjson\r\nTransfer-Encoding: {coding}\r\n\r\n"
                f"{len(body):x}\r\n"
            ).encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        answer = read_http_answer(conn)
    assert answer.startswith(b"HTTP/1.1 501 "), answer[:300]
    error = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "unsupported_transfer_coding", error
    assert coding.split(",", maxsplit=1)[0] in error["message"], error
    assert queued_ids(redis_url) == []
    assert intake.post(events(1)).status_code == 200  # chunked alone is fine (httpx: length)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"events": [', "not valid JSON (line 1, column"),
        (b"[]", '{"events": [...]}'),
        (b'{"events": {"id": "x"}}', "events: must be a list"),
        (b'{"events": [], "destination": "b"}', "'destination' is not a field"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_a_malformed_envelope_gets_400(
    intake: IntakeProcess, redis_url: str, body: bytes, says: str
) -> None:
    resp = intake.post(content=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "malformed"
    assert says in resp.json()["error"]["message"]
    assert queued_ids(redis_url) == []


@pytest.mark.parametrize("outage", ["kill", "freeze", "full"])
def test_redis_away_gets_503_with_retry_after_then_the_same_request_succeeds(
    tmp_path: Path, outage: str
) -> None:
    with RedisProcess(tmp_path) as rp:
        server = start_intake(tmp_path, rp.url)
        try:
            batch = events(20, prefix="r-")
            assert server.post(batch[:1]).status_code == 200  # connected before the outage
            {"kill": rp.kill, "freeze": rp.freeze, "full": lambda: rp.fill(200_000)}[outage]()
            resp = server.post(batch)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "3"
            body = resp.json()
            assert body["error"]["code"] == "queue_unavailable"
            # Full: Redis refused the write. Killed or frozen: the call may have been taken
            # before its answer was lost (redis-py sends it again on a new connection).
            untaken = "not_queued" if outage == "full" else "unconfirmed"
            assert [r["status"] for r in body["results"]][1:] == [untaken] * 19
            assert ("full" in body["error"]["message"]) == (outage == "full")
            {"kill": rp.start, "freeze": rp.thaw, "full": rp.unfill}[outage]()

            again = server.post(batch)
            assert again.status_code == 200, again.text
            statuses = {r["status"] for r in again.json()["results"]}
            assert statuses <= {"queued", "duplicate"}
            ids = queued_ids(rp.url)
            if outage == "kill":  # a restarted Redis without persistence lost the first
                assert ids == [e["id"] for e in batch]
            else:
                assert sorted(ids) == sorted(e["id"] for e in batch)  # each exactly once
            assert server.post(batch).json()["duplicates"] == 20
        finally:
            server.stop()


def test_no_raw_email_or_token_reaches_redis_logs_or_answers(
    intake: IntakeProcess, redis_url: str
) -> None:
    batch = [
        signup("s-secret", email=SECRET_EMAIL, source_url="https://shop.example/w"),
        *mixed_batch(),
    ]
    batch[-1]["user"]["email"] = SECRET_EMAIL.replace("ada", "bob")
    # An email address given as a key (refused: no such field): the client's answer names
    # it, and the live view's ring (in Redis) named it too.
    carol = SECRET_EMAIL.replace("ada", "carol")
    batch.append({**signup("s-key", source_url="https://shop.example/w"), "user": {carol: "x"}})
    answers = [intake.post(batch).text, intake.post(batch, token="Bearer-" + TOKEN).text]
    answers.append(intake.post(content=orjson.dumps({"events": batch})[:-3]).text)
    assert all(SECRET_EMAIL not in a and TOKEN not in a for a in answers)
    dump = redis_dump(redis_url)
    assert b"s-secret" in dump  # the event is there, hashed
    assert SECRET_EMAIL.encode() not in dump and b"bob.lovelace" not in dump
    assert b"carol" not in dump, dump
    assert b"user: has a key that is not a user field" in dump  # the ring says where
    assert TOKEN.encode() not in dump
    log = intake.stop()
    assert '"logger":"capi.intake.access"' in log
    assert SECRET_EMAIL not in log and "bob.lovelace" not in log and TOKEN not in log
    line = next(x for x in log.splitlines() if '"POST /v1/events 200"' in x)
    record = orjson.loads(line)
    assert record["token"] == "sha256:" + tokens.digest(TOKEN)[:8]
    assert (record["events"], record["queued"], record["refused"]) == (9, 4, 4)


def test_concurrent_requests_each_get_an_access_line(tmp_path: Path, redis_url: str) -> None:
    """Requests answered in the same turn share one logging record, written a line each:
    every request is in the log once, with its own client, status and counts, and the last
    ones are written before the server exits."""
    server = start_intake(tmp_path, redis_url)
    batches = [events(1, start=i, prefix="acc-") for i in range(40)]

    def post(i: int) -> int:
        token = TOKEN if i % 4 else "wrong-token-for-the-access-log-0001"
        return server.post(batches[i], token=token).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(post, range(40)))
    log = server.stop()
    records = [
        orjson.loads(line) for line in log.splitlines() if '"logger":"capi.intake.access"' in line
    ]
    answered = sorted(r["message"] for r in records if r["message"] != "GET /healthz 200")
    assert answered == sorted(f"POST /v1/events {s}" for s in statuses)
    assert all(r["client"].startswith("127.0.0.1:") for r in records)
    ok = [r for r in records if r["message"] == "POST /v1/events 200"]
    assert len(ok) == 30 and all((r["events"], r["queued"]) == (1, 1) for r in ok)
    assert all(r["level"] == "info" and r["ts"].endswith("+00:00") for r in records)


def _schema_for(doc: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    schema = response["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}


def test_the_openapi_document_validates_and_describes_every_answer(
    tmp_path: Path, redis_url: str
) -> None:
    server = start_intake(tmp_path, redis_url, CAPI_INTAKE_MAX_BODY_BYTES="20000")
    try:
        doc = httpx.get(server.url + "/openapi.json").json()
        validate_spec(doc)
        operation = doc["paths"]["/v1/events"]["post"]
        answers = [
            server.post(mixed_batch()),
            server.post(content=b"{"),
            server.post(events(1), token=None),
            server.post(events(1), destination="elsewhere"),
            server.post(events(100)),
            server.post(events(1), content_type="text/csv"),
        ]
        with RedisProcess(tmp_path) as rp:
            away = start_intake(tmp_path, rp.url)
            rp.kill()
            answers.append(away.post(events(2)))
            away.stop()
        seen = {r.status_code for r in answers}
        assert seen == {200, 400, 401, 403, 413, 415, 503}
        for resp in answers:
            documented = operation["responses"][str(resp.status_code)]
            jsonschema.validate(resp.json(), _schema_for(doc, documented))
            for header in documented.get("headers", {}):
                assert header.lower() in resp.headers, (resp.status_code, header)
        for path in ("/healthz", "/readyz"):
            resp = httpx.get(server.url + path)
            documented = doc["paths"][path]["get"]["responses"][str(resp.status_code)]
            jsonschema.validate(resp.json(), _schema_for(doc, documented))
        assert httpx.get(server.url + "/metrics").status_code == 200
        error = {"$ref": "#/components/schemas/Error", "components": doc["components"]}
        for resp in (httpx.get(server.url + "/v1/events"), httpx.post(server.url + "/nowhere")):
            assert resp.status_code in (404, 405)  # named in the document's description
            jsonschema.validate(resp.json(), error)
        assert "404" in doc["info"]["description"] and "405" in doc["info"]["description"]
    finally:
        server.stop()


def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    with RedisProcess(tmp_path) as rp:
        server = start_intake(tmp_path, rp.url)
        try:
            assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
            server.post(mixed_batch())
            server.post(events(1), token="nope")
            metrics = httpx.get(server.url + "/metrics").text
            counted = 'capi_intake_events_total{destination="default",outcome="%s"} %s'
            for outcome, n in (("queued", 3), ("refused", 3), ("duplicate", 1)):
                assert counted % (outcome, float(n)) in metrics
            assert 'capi_intake_requests_total{status="401"} 1.0' in metrics
            assert 'capi_intake_request_duration_seconds_count{route="/v1/events"} 2.0' in metrics
            rp.kill()
            ready = httpx.get(server.url + "/readyz")
            assert ready.status_code == 503 and "Redis" in ready.json()["reason"]
            assert httpx.get(server.url + "/healthz").status_code == 200
            assert httpx.get(server.url + "/v1/events").status_code == 405
            assert httpx.get(server.url + "/nowhere").status_code == 404
        finally:
            server.stop()


def test_sigterm_lets_a_request_in_flight_finish(tmp_path: Path) -> None:
    with RedisProcess(tmp_path) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_REDIS_TIMEOUT_S="10")
        assert server.post(events(1)).status_code == 200
        rp.freeze()  # the next request waits on Redis
        answer: list[httpx.Response] = []
        batch = events(5, prefix="late-")
        thread = threading.Thread(target=lambda: answer.append(server.post(batch)))
        thread.start()
        wait_for(lambda: rp.unread_bytes() > 0, what="the request's command waiting in Redis")
        server.proc.send_signal(15)
        wait_for(lambda: "Shutting down" in server.log(), what="the server shutting down")
        assert server.proc.poll() is None  # still finishing the request
        rp.thaw()
        thread.join(20)
        assert answer[0].status_code == 200 and answer[0].json()["queued"] == 5
        assert server.proc.wait(20) == 0
        assert "late-p-0" in queued_ids(rp.url)


def test_intake_token_prints_a_new_token_once_with_the_line_to_configure(
    tmp_path: Path, redis_url: str
) -> None:
    settings = Settings(_env_file=None, redis_url=redis_url)
    first = capi(settings, "intake-token", "--json")
    assert first.returncode == 0, first.stderr
    made = orjson.loads(first.stdout)
    assert made["sha256"] == tokens.digest(made["token"]) and len(made["token"]) >= 43
    assert made["config_line"] == f"CAPI_INTAKE_TOKENS_SHA256={made['sha256']}"
    assert orjson.loads(capi(settings, "intake-token", "--json").stdout)["token"] != made["token"]
    human = capi(settings, "intake-token")
    assert "shown only this once" in human.stdout and "CAPI_INTAKE_TOKENS_SHA256=" in human.stdout

    path = tmp_path / "destinations.toml"
    write_destinations(path)
    multi = Settings(_env_file=None, redis_url=redis_url, destinations_file=path)
    assert capi(multi, "intake-token").returncode == 2  # which destination?
    unknown = capi(multi, "intake-token", "--destination", "zz")
    assert unknown.returncode == 2 and "the destinations are: a, b" in unknown.stderr
    for_b = orjson.loads(capi(multi, "intake-token", "--destination", "b", "--json").stdout)
    assert for_b["config_line"] == f'intake_tokens_sha256 = ["{for_b["sha256"]}"]'


def test_intake_token_warns_of_a_file_git_would_commit(tmp_path: Path, redis_url: str) -> None:
    """--output into a checkout wrote the token where `git add .` picks it up, unsaid:
    the documented name (intake-token.json) is git-ignored here, any other name was not."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "shop"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("intake-token.json\n")
    settings = Settings(_env_file=None, redis_url=redis_url)
    exposed = capi(settings, "intake-token", "--output", str(repo / "client-token.json"))
    assert exposed.returncode == 0, exposed.stderr
    assert orjson.loads((repo / "client-token.json").read_bytes())["token"]
    warning = [line for line in exposed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, exposed.stderr
    assert "client-token.json is inside a git checkout and not git-ignored" in warning[0]
    assert ".gitignore" in warning[0]
    for quiet in (repo / "intake-token.json", tmp_path / "elsewhere.json"):
        written = capi(settings, "intake-token", "--output", str(quiet))
        assert written.returncode == 0 and "warning" not in written.stderr, written.stderr


def test_serve_refuses_to_start_without_a_token(redis_url: str) -> None:
    result = capi(Settings(_env_file=None, redis_url=redis_url), "serve", "--port", "0")
    assert result.returncode == 3
    assert "no intake token is configured" in result.stderr and "Traceback" not in result.stderr
    bad = capi(
        Settings(_env_file=None, redis_url=redis_url, intake_tokens_sha256="abc"),
        "serve",
        "--port",
        "0",
    )
    assert bad.returncode == 3 and "CAPI_INTAKE_TOKENS_SHA256" in bad.stderr


CLIENTS = Path(__file__).resolve().parents[1] / "docs" / "intake.md"


def client_block(language: str) -> str:
    """docs/intake.md's one ```<language> block (the intake's client example)."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", CLIENTS.read_text(), re.M | re.S)
    assert len(blocks) == 1, f"docs/intake.md has {len(blocks)} {language} blocks"
    return str(blocks[0])


def run_client(tmp_path: Path, redis_url: str, command: list[str], event_id: str) -> str:
    server = start_intake(tmp_path, redis_url)
    try:
        env = {**os.environ, "INTAKE_URL": server.url, "INTAKE_TOKEN": TOKEN}
        env["GOCACHE"] = env.get("GOCACHE", str(Path.home() / ".cache" / "go-build"))
        proc = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert queued_ids(redis_url) == [event_id]
    finally:
        server.stop()
    return proc.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_node_client_of_docs_intake_runs_as_written(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "send.mjs").write_text(client_block("js"))
    output = run_client(tmp_path, redis_url, ["node", "send.mjs"], "order-2001")
    assert output == "0 order-2001 queued []\n"


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (.ci/run installs it)")
def test_the_go_client_of_docs_intake_runs_as_written(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "main.go").write_text(client_block("go"))
    output = run_client(tmp_path, redis_url, ["go", "run", "main.go"], "order-3001")
    assert output == "0 order-3001 queued []\n"


def test_several_server_processes_serve_one_port(tmp_path: Path, redis_url: str) -> None:
    server = start_intake(tmp_path, redis_url, "--workers", "2")
    try:
        for i in range(4):  # new connections: either process may answer
            resp = server.post(events(2, prefix=f"w{i}-"))
            assert resp.status_code == 200 and resp.json()["queued"] == 2
        assert len(queued_ids(redis_url)) == 8
    finally:
        log = server.stop()
    assert log.count("Application startup complete") == 2


def serve_process(redis_url: str, *args: str) -> subprocess.Popen[str]:
    """``capi serve ARGS`` with the test token granted; its output, both streams, in one."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", *args],
        env=intake_env(redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def served(proc: subprocess.Popen[str], said: str) -> str:
    """The URL a ``capi serve`` says on its first line (which starts with ``said``), once
    /healthz answers there; then it is stopped, and must exit 0."""
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(said), first
        url = first.split()[3]
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, what=f"capi serve on {url}")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    return url


def test_several_server_processes_on_port_0_say_the_port_they_got(redis_url: str) -> None:
    """With --workers, the first line said "capi serve on http://127.0.0.1:0": the port was
    bound later, by uvicorn, and only its own log line said which one."""
    proc = serve_process(redis_url, "--port", "0", "--workers", "2")
    url = served(proc, "capi serve on http://127.0.0.1:")
    assert not url.endswith(":0"), url


def test_several_server_processes_on_a_taken_port_say_so_without_claiming_to_serve(
    redis_url: str,
) -> None:
    """A taken port is refused as for one process (exit 3, what to do); with --workers the
    first line claimed "capi serve on ..." and then uvicorn logged only "[Errno 98]"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve_process(redis_url, "--port", str(port), "--workers", "2")
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, output
    assert "capi serve on" not in output and "Traceback" not in output, output
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in output, output


def test_serve_on_an_ipv6_address_says_its_url(redis_url: str) -> None:
    """--host ::1 was refused as "--port 0: cannot listen on ::1:0 (Address family for
    hostname not supported ...); choose another port, or --port 0 for a free one"."""
    served(serve_process(redis_url, "--host", "::1", "--port", "0"), "capi serve on http://[::1]:")


def test_serve_on_an_address_not_of_this_machine_names_the_host_not_the_port(
    redis_url: str,
) -> None:
    host = "203.0.113.77"  # TEST-NET-3: documentation only, normally no machine's
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
            pytest.skip(f"{host} is an address of this machine")
        except OSError:
            pass
    proc = serve_process(redis_url, "--host", host, "--port", "0")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, output
    assert f"--host {host}: cannot listen on {host}:0" in output, output
    assert "choose another port" not in output and "Traceback" not in output, output
