"""The dedup record: repeats within the window are dropped, unique events never are, and a
dead-lettered event's corrected successor is sent under the same id."""

from __future__ import annotations

import hashlib

import redis

from capi import dedup
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from tests.helpers import dead_letters, doom, drain, enqueue, events, make_settings


def test_a_repeat_within_the_window_is_dropped_and_unique_events_are_not(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    evts = events(3000)
    with SyncProducer.from_settings(settings) as producer:
        first = producer.enqueue_many(evts)
        again = producer.enqueue_many(evts[:1000])
        assert not producer.enqueue(evts[5])
    assert (first.queued, first.duplicates) == (3000, 0)
    assert (again.queued, again.duplicates) == (0, 1000)
    with redis.Redis.from_url(redis_url) as c:
        assert c.xlen(settings.keys.stream) == 3000


def test_the_same_id_under_another_event_name_is_another_event(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    order = events(2)[0]  # a purchase "p-0"
    signup = dict(events(2)[1], id=order["id"])  # a signup with the same id
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(order) and producer.enqueue(signup)


def test_digests_sharing_a_shard_are_told_apart(redis_url: str, sandbox: SandboxThread) -> None:
    # Find ids whose digests share their first two bytes (the shard), so they sit in the
    # same string; each must still count as its own event, and a repeat as a repeat.
    settings = make_settings(sandbox, redis_url)
    by_shard: dict[bytes, list[str]] = {}
    base = events(1)[0]
    n = 0
    while True:
        name_id = f"{base['type']}:x-{n}"
        group = by_shard.setdefault(dedup.digest(name_id)[:2], [])
        group.append(f"x-{n}")
        n += 1
        if len(group) == 3:
            break
    same_shard = [dict(base, id=i) for i in group]
    with SyncProducer.from_settings(settings) as producer:
        assert [producer.enqueue(e) for e in same_shard] == [True, True, True]
        assert [producer.enqueue(e) for e in same_shard] == [False, False, False]


def test_the_window_is_a_setting(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, dedup_window_s=0)  # dedup off
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(events(1)[0]) and producer.enqueue(events(1)[0])


def test_a_dead_lettered_event_can_be_corrected_and_sent_under_its_id(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    evts = events(4)
    enqueue(settings, evts)
    [bad] = doom(settings, positions=[1])
    drain(settings)
    assert set(dead_letters(settings)) == {bad}
    corrected = next(e for e in evts if e["id"] == bad)
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(corrected), "the corrected event was taken for a duplicate"
        assert not producer.enqueue(evts[0])  # delivered ones still dedup
    drain(settings)
    assert sandbox.state.delivered_ids()[bad] == 1


def test_digest_is_blake2b_of_name_and_id() -> None:
    expected = hashlib.blake2b(b"order_created:1042", digest_size=16).digest()
    assert dedup.digest("order_created:1042") == expected
