"""``capi tail``: live outcomes from a real worker, the intake and the producer, read from the
ring in Redis; never a value or hash of an identifier; the ring stays within its bound."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

from capi import tail
from capi.errors import EventRejected
from capi.producer import Producer, SyncProducer
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.helpers import (
    _plain,
    capi,
    doom,
    enqueue,
    events,
    make_settings,
    start_worker,
    stop_worker,
    terminate,
    wait_for,
)
from tests.intake_helpers import start_intake
from tests.redisproc import RedisProcess


class Follower:
    """``capi tail --follow --json`` in a process of its own; lines kept as they arrive,
    each with the wall-clock time it was read."""

    def __init__(self, settings: Settings, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
        env["CAPI_CONFIG_FILE"] = os.devnull
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "tail", "--follow", "--json", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, dict[str, object]]] = []
        self.raw: list[str] = []
        self.errors: list[str] = []  # its stderr, line by line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_errors, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.raw.append(text)
            self.lines.append((time.time(), json.loads(text)))

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(self.proc.stderr)

    def where(self, **match: object) -> list[dict[str, object]]:
        return [line for _, line in self.lines if all(line.get(k) == v for k, v in match.items())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            terminate(self.proc)
        self._reader.join(5)
        self._err_reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_following(client: redis.Redis) -> None:
    """Until a follower's XREAD blocks in Redis (a loaded machine can take seconds to start
    one): from then on it misses nothing."""
    following = lambda: any(x.get("cmd") == "xread" for x in client.client_list())  # noqa: E731
    wait_for(following, 30, "the follower following")


@pytest.fixture
def follower(redis_url: str, sandbox: SandboxThread) -> Iterator[Follower]:
    settings = make_settings(sandbox, redis_url)
    follower = Follower(settings, "--lines", "1000")
    try:
        yield follower
    finally:
        follower.stop()


def test_tail_follow_prints_each_outcome_within_two_seconds_and_no_identifier(
    follower: Follower, redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=5)
    evts = events(21)
    enqueue(settings, evts)
    [doomed] = doom(settings, positions=[7])
    # Whenever the follower starts reading, it misses nothing: what came before its first
    # read it prints as recent outcomes (up to --lines), then it follows from there. The
    # two seconds are from then on: wait until it follows (its XREAD blocks in Redis; a
    # loaded machine can take seconds to start it).
    with redis.Redis.from_url(redis_url) as c:
        wait_following(c)
    worker = start_worker(settings)
    intake = start_intake(tmp_path, redis_url)
    try:
        wait_for(lambda: len(sandbox.state.delivered_ids()) == 20, 30, "deliveries")
        refused = intake.post([{"id": "bad-1", "type": "registration_completed"}])
        assert refused.json()["refused"] == 1
        wait_for(lambda: len(follower.where(status="delivered")) == 20, 10, "delivered lines")
        wait_for(lambda: follower.where(status="refused"), 10, "the refused line")
        wait_for(lambda: follower.where(status="dead_lettered"), 10, "the dead-lettered line")
    finally:
        intake.stop()
        stop_worker(worker)
    delivered = follower.where(status="delivered")
    assert {d["id"] for d in delivered} == {e["id"] for e in evts} - {doomed}
    for read_at, line in follower.lines:
        if line["status"] == "delivered":
            written = datetime.fromisoformat(str(line["time"]).replace("Z", "+00:00"))
            assert read_at - written.timestamp() < 2.0, line
            assert str(line["request_id"]).startswith("req_sbx_")
            assert line["destination"] == "default" and line["type"] in (
                "registration_completed",
                "order_created",
            )
            assert "email" in line["identifiers"]  # the kinds carried, by name
    [dead] = follower.where(status="dead_lettered")
    assert dead["id"] == doomed and dead["reason"] == "invalid_event"
    [bad] = follower.where(status="refused")
    assert bad["id"] == "bad-1" and "timestamp_ms" in str(bad["reason"])
    text = "".join(follower.raw)
    assert "@example.com" not in text and "+1" not in text
    for e in evts:  # no hash of any identifier either
        for values in (e.get("user") or {}).values():
            for value in values if isinstance(values, list) else [values]:
                assert str(value) not in text


def test_tail_prints_recent_outcomes_filtered(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(6))
    [doomed] = doom(settings, positions=[2])
    worker = start_worker(settings, "--burst")
    worker.communicate(timeout=60)
    assert worker.returncode == 0
    shown = capi(settings, "tail", "--json")
    lines = [json.loads(t) for t in shown.stdout.splitlines()]
    assert shown.returncode == 0 and len(lines) == 6
    assert [line["time"] for line in lines] == sorted(line["time"] for line in lines)
    only = capi(settings, "tail", "--status", "dead_lettered")
    assert only.returncode == 0 and doomed in only.stdout and "invalid_event" in only.stdout
    assert len(only.stdout.splitlines()) == 1
    by_id = capi(settings, "tail", "--id", doomed, "--json")
    assert [json.loads(t)["status"] for t in by_id.stdout.splitlines()] == ["dead_lettered"]
    # Nothing matching is said (on stderr), not left as an empty answer.
    none = capi(settings, "tail", "--id", "no-such-event", "--status", "delivered")
    assert none.returncode == 0 and not none.stdout
    assert "no outcome kept matches --id no-such-event and --status delivered" in none.stderr


def test_the_ring_stays_within_its_bound_after_100000_events(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = Settings(_env_file=None, redis_url=redis_url)
    key = settings.keys.tail
    entries = settings.tail_entries
    for batch in range(200):  # 100,000 events in batches of 500, as a busy worker writes
        found = [
            (f"event-{batch}-{i:03d}", "order_created", ["email", "phone"], 1_764_000_000_000)
            for i in range(500)
        ]
        outcome = tail.Outcome("delivered", found, request_id="req_x", latency_ms=3.2)
        tail.append_sync(client, tail.writes(key, outcome, entries), entries)
    held = client.xlen(key)
    memory = client.memory_usage(key, samples=0)
    client.close()
    # The bound the module states: (entries + 100) * CHUNK outcomes, ~1.5 MB.
    assert held <= entries + 100
    assert held * tail.CHUNK <= (entries + 100) * tail.CHUNK
    assert memory is not None and memory < 2_000_000, memory


def test_the_ring_can_be_turned_off(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, tail_entries=0)
    enqueue(settings, events(5))
    worker = start_worker(settings, "--burst")
    worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert len(sandbox.state.delivered_ids()) == 5
    assert redis.Redis.from_url(redis_url).exists(settings.keys.tail) == 0


@pytest.mark.parametrize(
    ("event", "name"),
    [
        ({"id": "a", "type": "order_created", "data": {"type": "contents"}}, "order_created"),
        (
            {"id": "b", "type": "custom", "custom_event_name": "quiz_done", "data": {}},
            "quiz_done",
        ),
        ({"id": 'x"type":"lie', "type": "lead_created", "data": {}}, "lead_created"),
    ],
)
def test_the_ring_names_an_event_from_its_json_without_parsing_it(
    event: dict[str, object], name: str
) -> None:
    import orjson

    assert tail.name_of_json(orjson.dumps(event)) == name


def test_a_consent_denied_event_is_a_skipped_line_without_identifier_kinds(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    denied = {**events(1)[0], "consent": "denied"}
    enqueue(settings, [denied])
    shown = capi(settings, "tail", "--json")
    [line] = [json.loads(t) for t in shown.stdout.splitlines()]
    assert line["status"] == "skipped" and line["id"] == denied["id"]
    assert line["identifiers"] == [] and "consent" in line["reason"]


def test_a_ring_redis_refuses_is_logged_and_the_event_still_queued(
    redis_url: str, sandbox: SandboxThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The ring is a view: not writing it must not fail the enqueue, but it was silent."""
    settings = make_settings(sandbox, redis_url)
    client = redis.Redis.from_url(redis_url)
    client.set(settings.keys.tail, "not a stream")  # XADD to it is refused (WRONGTYPE)
    denied = {**events(1)[0], "consent": "denied"}  # a skipped line for the ring
    with caplog.at_level("WARNING", logger="capi.producer"):
        enqueue(settings, [denied, *events(2, start=1)])
    assert client.xlen(settings.keys.stream) == 2
    assert "capi tail misses 1 outcome(s) of this enqueue" in caplog.text, caplog.text


def test_an_event_refused_by_enqueue_is_a_refused_line(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """enqueue() of one event raised EventRejected and the ring never heard of it (only
    enqueue_many and the intake wrote refusals), though capi tail says it shows them."""
    settings = make_settings(sandbox, redis_url)
    bad = {**events(1, prefix="bad-sync-")[0], "timestamp_ms": "yesterday"}
    with SyncProducer.from_settings(settings) as producer, pytest.raises(EventRejected):
        producer.enqueue(bad)

    async def refused_async() -> None:
        async with Producer.from_settings(settings) as producer:
            with pytest.raises(EventRejected):
                await producer.enqueue({**bad, "id": "bad-async-0"})

    asyncio.run(refused_async())
    shown = capi(settings, "tail", "--json", "--status", "refused")
    lines = {json.loads(t)["id"]: json.loads(t) for t in shown.stdout.splitlines()}
    assert set(lines) == {bad["id"], "bad-async-0"}, shown.stdout
    assert all("timestamp_ms" in line["reason"] for line in lines.values()), lines


def test_a_refused_line_names_every_broken_rule_up_to_a_few(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """capi tail showed only the first of an event's problems: an operator fixed it, sent
    again, and met the next one."""
    settings = make_settings(sandbox, redis_url)
    good = events(1, prefix="two-")[0]
    two = {**good, "timestamp_ms": "yesterday", "action_source": "fax"}
    many = {k: v for k, v in good.items() if k not in ("timestamp_ms", "action_source")}
    many = {**many, "id": "many-0", "type": "nonsense", "extra1": 1, "extra2": 2, "extra3": 3}
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([two, many])
    told = {i: exc.problems for i, exc in report.refused}
    assert len(told[0]) == 2 and len(told[1]) > 4, told
    shown = capi(settings, "tail", "--json", "--status", "refused")
    lines = {json.loads(t)["id"]: json.loads(t)["reason"] for t in shown.stdout.splitlines()}
    assert "timestamp_ms" in lines[two["id"]] and "action_source" in lines[two["id"]], lines
    assert "more" not in lines[two["id"]]
    assert lines["many-0"].endswith(f"and {len(told[1]) - 3} more"), lines
    text = capi(settings, "tail", "--status", "refused").stdout
    assert "action_source" in text and f"and {len(told[1]) - 3} more" in text, text


def test_the_ring_names_no_key_the_client_made_up(redis_url: str, sandbox: SandboxThread) -> None:
    """A refusal under a key of the event's own (an email address used as a key) kept that
    key in Redis, in the ring's reason."""
    settings = make_settings(sandbox, redis_url)
    odd = {**events(1, prefix="odd-")[0], "user": {"dan.lovelace@example.com": "\ud800"}}
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([odd])
    assert "dan.lovelace@example.com" in str(report.refused[0][1])  # the caller is told
    ring = redis.Redis.from_url(redis_url).xrange(settings.keys.tail)
    kept = b"".join(v for _, fields in ring for v in fields.values())
    assert b"lovelace" not in kept and b"under a key of the event's own" in kept, kept


def test_tail_follow_waits_quietly_under_a_short_redis_timeout(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """With CAPI_REDIS_TIMEOUT_S at 1 s or below, a follow whose rings stay quiet for its
    read's block (1 s) went on; it exited 5 ("Redis did not answer within
    CAPI_REDIS_TIMEOUT_S") after the first quiet second."""
    settings = make_settings(sandbox, redis_url, redis_timeout_s=0.5)
    follower = Follower(settings)
    try:
        with redis.Redis.from_url(redis_url) as c:
            wait_following(c)
        with pytest.raises(AssertionError):  # quiet for several blocks: it stays
            wait_for(lambda: follower.proc.poll() is not None, 4, "the follower exiting")
        enqueue(settings, events(3))
        worker = start_worker(settings)
        try:
            wait_for(lambda: len(follower.where(status="delivered")) == 3, 30, "the lines")
        finally:
            stop_worker(worker)
    finally:
        follower.stop()
    assert not any("error" in line for line in follower.errors), follower.errors


def test_tail_follow_keeps_following_through_redis_going_away(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """A Redis that goes away for a while (a restart here; a Sentinel or Cluster failover
    does the same to a follower's connection) does not end ``capi tail --follow``: it says
    on stderr that Redis is away and that it is back, and prints the outcomes after it.
    Before, it exited 5 on the first failed read ("Redis is not reachable ...")."""
    with RedisProcess(tmp_path, persist=True) as server:
        settings = make_settings(sandbox, server.url)
        before, after = events(5, prefix="before-"), events(5, prefix="after-")
        follower = Follower(settings, "--lines", "100")
        worker = start_worker(settings)
        try:
            enqueue(settings, before)
            wait_for(lambda: len(follower.where(status="delivered")) == 5, 30, "lines before")
            server.kill()  # kill -9: the follower's read fails
            wait_for(lambda: "still following" in "".join(follower.errors), 30, "it says so")
            assert follower.proc.poll() is None
            server.start()  # the same port, its data kept
            enqueue(settings, after)
            wait_for(lambda: len(follower.where(status="delivered")) == 10, 30, "lines after")
            wait_for(lambda: "following again" in "".join(follower.errors), 30, "it says so")
            assert follower.proc.poll() is None
        finally:
            stop_worker(worker)
            follower.stop()
    errors = "".join(follower.errors)
    assert "Traceback" not in errors and "error:" not in errors, errors
    delivered = {str(line["id"]) for line in follower.where(status="delivered")}
    assert delivered == {e["id"] for e in before + after}


def test_the_ring_keeps_no_type_or_event_name_a_valid_event_could_not_have(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """A refused event's type and custom event name went to Redis as sent: a column that
    slipped (an email address, a phone number in the type) was kept in the ring and shown by
    capi tail and the console. Only what a valid event could carry is kept, else '?'."""
    settings = make_settings(sandbox, redis_url)
    slipped = [
        {**events(1, prefix="slip-a-")[0], "type": "dan.lovelace@example.com"},
        {**events(1, prefix="slip-b-")[0], "type": "custom", "custom_event_name": "+1 415 555 01"},
        {**events(1, prefix="slip-c-")[0], "type": "purchase"},  # a wrong type, shaped as one
    ]
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(slipped)
    assert len(report.refused) == 3
    ring = redis.Redis.from_url(redis_url).xrange(settings.keys.tail)
    kept = b"".join(v for _, fields in ring for v in fields.values())
    assert b"lovelace" not in kept and b"555" not in kept, kept
    shown = capi(settings, "tail", "--json", "--status", "refused")
    lines = {json.loads(t)["id"]: json.loads(t) for t in shown.stdout.splitlines()}
    assert [lines[e["id"]]["type"] for e in slipped] == ["?", "?", "purchase"], lines


def test_tail_follow_keeps_following_when_its_master_is_made_a_replica(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """A switchover makes the master a replica: Redis ends the follower's blocked read with
    "UNBLOCKED force unblock from blocking operation, instance state changed (master ->
    replica?)". That is a failover passing like the others: ``capi tail --follow`` exited 5
    on it ("Redis answered with an error")."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with RedisProcess(tmp_path / "a") as server, RedisProcess(tmp_path / "b") as other:
        settings = make_settings(sandbox, server.url)
        follower = Follower(settings)
        try:
            with server.client() as c:
                wait_following(c)
                c.replicaof("127.0.0.1", other.port)
                said = lambda: "still following" in "".join(follower.errors)  # noqa: E731
                wait_for(lambda: said() or follower.proc.poll() is not None, 30, "a word")
                assert follower.proc.poll() is None, follower.errors
                c.replicaof("no", "one")
            wait_for(lambda: "following again" in "".join(follower.errors), 30, "it says so")
            enqueue(settings, events(2))
            worker = start_worker(settings)
            try:
                wait_for(lambda: len(follower.where(status="delivered")) == 2, 30, "the lines")
            finally:
                stop_worker(worker)
        finally:
            follower.stop()
    assert "error:" not in "".join(follower.errors), follower.errors


def test_recent_outcomes_over_many_rings_keep_only_the_lines_asked_for(redis_url: str) -> None:
    """`capi tail -n 1000` over 1,000 destinations' rings held every ring's lines at once
    (390 MB) to print a thousand: the newest are kept from one ring to the next."""
    import tracemalloc

    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)

    def fill(first: int, rings: int) -> None:
        for d in range(first, first + rings):
            found = []
            for j in range(50):
                events = [(f"t{d}-{j}-{k}", "order_created", ["em"], now) for k in range(10)]
                outcome = tail.Outcome(status="delivered", events=events, request_id=f"r{j}")
                found += tail.writes(f"ring:{d}", outcome, 200)
            tail.append_sync(client, found, 200)

    def newest(rings: int, **filters: object) -> tuple[list[tail.Line], int]:
        async def go() -> list[tail.Line]:
            r = redis.asyncio.Redis.from_url(redis_url)
            try:
                names = {f"d{d}": f"ring:{d}" for d in range(rings)}
                return (await tail.recent(r, names, 100, **filters))[0]  # type: ignore[arg-type]
            finally:
                await r.aclose()

        tracemalloc.start()
        try:
            return asyncio.run(go()), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    fill(0, 10)
    newest(10)  # warm
    few, few_peak = newest(10)
    fill(10, 50)
    many, many_peak = newest(60)
    assert len(few) == len(many) == 100
    assert [line.time_ms for line in many] == sorted(line.time_ms for line in many)
    assert many_peak < 2 * few_peak, f"{few_peak:,} B over 10 rings, {many_peak:,} B over 60"
    only, _ = newest(60, whole=True, ids=["t7-3-1", "t55-49-0"])
    assert sorted(line.id for line in only) == ["t55-49-0", "t7-3-1"]
    client.close()


def test_an_intake_line_that_is_not_json_is_a_refused_line_saying_so(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    """The intake answered "line 2 is not valid JSON", but capi tail showed the line as
    "(event): must be a JSON object, got null": the ring was told of the stand-in the
    producer refused, not of the line."""
    settings = make_settings(sandbox, redis_url)
    good = json.dumps(events(1, prefix="nd-")[0])
    intake = start_intake(tmp_path, redis_url)
    try:
        answer = intake.post(
            content=f"{good}\n{{not json\n".encode(), content_type="application/x-ndjson"
        )
    finally:
        intake.stop()
    assert answer.json()["results"][1]["errors"][0]["rule"] == "line 2 is not valid JSON"
    shown = capi(settings, "tail", "--json", "--status", "refused")
    [line] = [json.loads(t) for t in shown.stdout.splitlines()]
    assert line["reason"] == "(event): line 2 is not valid JSON", line


def test_a_capi_enqueue_line_that_is_not_json_is_a_refused_line_too(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """capi enqueue refused such a line on its own, before the producer: capi tail, which
    shows the intake's, never heard of it."""
    settings = make_settings(sandbox, redis_url)
    good = json.dumps(events(1, prefix="cli-")[0])
    given = capi(settings, "enqueue", input=f"{good}\n{{not json\n")
    assert given.returncode == 4, given.stderr
    assert "line 2: event refused: (line): is not valid JSON" in given.stderr
    shown = capi(settings, "tail", "--json", "--status", "refused")
    [line] = [json.loads(t) for t in shown.stdout.splitlines()]
    assert line["reason"].startswith("(line): is not valid JSON"), line


def test_a_line_naming_a_key_twice_keeps_the_key_out_of_the_ring(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    """A line that names a key twice is refused naming the key, to whoever sent it; the
    ring in Redis kept that key too (an email address used as a key), and capi tail showed
    it: capi enqueue's line, now that its lines reach the ring, and the intake's."""
    settings = make_settings(sandbox, redis_url)
    twice = '{"dan.lovelace@example.com": 1, "dan.lovelace@example.com": 2}'
    line = json.dumps({**events(1, prefix="dup-")[0], "user": "U"}).replace('"U"', twice)
    given = capi(settings, "enqueue", input=f"{line}\n")
    assert given.returncode == 4, given.stderr
    assert "repeats the key 'dan.lovelace@example.com' in one object" in given.stderr
    intake = start_intake(tmp_path, redis_url)
    try:
        answer = intake.post(content=f"{line}\n".encode(), content_type="application/x-ndjson")
    finally:
        intake.stop()
    [error] = answer.json()["results"][0]["errors"]
    assert "names the key 'dan.lovelace@example.com' twice" in error["rule"], error
    ring = redis.Redis.from_url(redis_url).xrange(settings.keys.tail)
    kept = b"".join(v for _, fields in ring for v in fields.values())
    assert b"lovelace" not in kept, kept
    shown = capi(settings, "tail", "--json", "--status", "refused")
    reasons = sorted(json.loads(t)["reason"] for t in shown.stdout.splitlines())
    assert reasons == [
        "(event): line 1 names a key twice in one object; send it once",
        "(line): repeats a key in one object; give each key once",
    ], reasons
