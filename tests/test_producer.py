"""Producers: validation before Redis, dedup, JSON only, no raw identifiers stored."""

from __future__ import annotations

import asyncio
import gc
import weakref

import orjson
import pytest
import redis

from capi.errors import EventRejected
from capi.events import signup
from capi.producer import Producer, SyncProducer
from capi.sandbox import SandboxThread
from tests.helpers import events, make_settings, redis_dump


def test_sync_enqueue_dedups_by_id(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings) as producer:
        event = signup("u-1", email="ada@example.com", source_url="https://a.example/")
        assert producer.enqueue(event) is True
        assert producer.enqueue(event) is False
        report = producer.enqueue_many(events(10) + events(10))
    assert (report.queued, report.duplicates) == (10, 10)
    assert redis.Redis.from_url(redis_url).xlen(settings.keys.stream) == 11


def test_async_enqueue_and_refusal_touches_nothing(redis_url: str, sandbox: SandboxThread) -> None:
    # Strict: a bad email refuses the event (by default it is left out: test_attribution).
    settings = make_settings(sandbox, redis_url, strict_identifiers=True)

    async def go() -> None:
        async with Producer.from_settings(settings) as producer:
            assert await producer.enqueue(events(1)[0])
            bad = signup("u-bad", email="not-an-email", source_url="https://a.example/")
            with pytest.raises(EventRejected, match=r"user.email\[0\]: must be an email"):
                await producer.enqueue(bad)
            report = await producer.enqueue_many([*events(3, start=10), bad, {"id": 1}])
            assert report.queued == 3
            assert [i for i, _ in report.refused] == [3, 4]

    asyncio.run(go())
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(settings.keys.stream) == 4
    assert not list(client.scan_iter(match="*u-bad*"))  # no dedup marker for a refused event


def test_redis_holds_json_events_without_raw_identifiers(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings) as producer:
        producer.enqueue(
            signup(
                "u-2",
                email="Grace.Hopper@Example.com",
                phone="+1 (415) 555-2671",
                first_name="Grace",
                last_name="Hopper",
                source_url="https://a.example/?e=x",
            )
        )
    dump = redis_dump(redis_url).lower()
    for raw in (b"grace.hopper@example.com", b"4155552671", b"hopper", b"grace"):
        assert raw not in dump
    entry = redis.Redis.from_url(redis_url).xrange(settings.keys.stream)[0][1]
    event = orjson.loads(entry[b"e"])  # JSON, not pickle
    assert event["user"]["emails_sha256"] and event["source_url"] == "https://a.example/"


def test_dedup_window_zero_disables_dedup(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, dedup_window_s=0)
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(events(2) + events(2))
    assert report.queued == 4


def test_redis_away_is_one_clear_error_and_the_cli_exits_5(sandbox: SandboxThread) -> None:
    import os

    from click.testing import CliRunner

    from capi.cli import cli
    from capi.errors import QueueUnavailable
    from capi.exitcodes import ExitCode
    from tests.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(sandbox, url)
    with (
        SyncProducer.from_settings(settings) as producer,
        pytest.raises(QueueUnavailable, match="the event was not queued"),
    ):
        producer.enqueue(events(1)[0])
    line = orjson.dumps(events(1)[0])
    result = CliRunner().invoke(
        cli, ["enqueue"], input=line, env={"CAPI_REDIS_URL": url, "CAPI_CONFIG_FILE": os.devnull}
    )
    assert result.exit_code == ExitCode.REDIS
    assert "could not be reached" in result.output


def test_an_enqueue_redis_refuses_leaves_no_dedup_record(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """The stream key holds a string: the enqueue fails, and once the key is repaired the
    same event is queued (not taken for a duplicate of the event that was never stored)."""
    settings = make_settings(sandbox, redis_url)
    client = redis.Redis.from_url(redis_url)
    client.set(settings.keys.stream, "not a stream")
    event = events(1, prefix="refused-")[0]
    with SyncProducer.from_settings(settings) as producer:
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            producer.enqueue(event)
        client.delete(settings.keys.stream)
        assert producer.enqueue(event) is True
    assert client.xlen(settings.keys.stream) == 1


def test_a_report_of_refused_events_lets_go_of_them_without_the_garbage_collector(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # Each refusal in a report carried the producer's frames (its traceback and the
    # ValidationError behind it), which held the report itself and every event of the
    # call: capi serve answering 8 bodies of 1,000 refused events (3.9 MB each) kept 3 GB
    # until a full collection, which capi's tuned collector runs seldom.
    class Raw(dict[str, object]):  # a dict that a weak reference can follow
        pass

    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings) as producer:
        bad = Raw({"id": "e-1", "type": "signup", "unknown": 0})
        seen = weakref.ref(bad)
        gc.disable()
        try:
            report = producer.enqueue_many([bad, *events(1)])
            assert [i for i, _ in report.refused] == [0] and report.queued == 1
            del bad, report
            assert seen() is None, "the refused event outlived its report"
        finally:
            gc.enable()


def test_a_deployment_of_many_destinations_is_named_in_ten_and_a_count(redis_url: str) -> None:
    """An enqueue that names no destination, or an unknown one, in a deployment of 3,000
    was refused with every name in the message (about 20 KB; 25 show it here)."""
    names = [f"d{i:02}" for i in range(25)]
    with SyncProducer(redis.Redis.from_url(redis_url), destinations=names) as producer:
        for destination in (None, "nope"):
            with pytest.raises(EventRejected) as refused:
                producer.enqueue(events(1)[0], destination)
            assert str(refused.value).endswith("d08, d09 and 15 more" + ")" * (not destination))
