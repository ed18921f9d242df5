"""What the console reads, against a real Redis: the overview of many destinations agrees
with ``capi status``'s reader, dead letters are paged through the time index, found by id
(glob characters and all) and masked; a removed destination still holding dead letters is
shown as removed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from capi import deadletters, status
from capi.console.views import HIDDEN, HIDDEN_HASH, masked
from capi.failures import Reason
from capi.queue import Queue
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.console_helpers import (
    httpx_get,
    new_tokens,
    scope_dead_letters,
    seed_dead_letters,
    start_console,
)
from tests.helpers import enqueue, events, make_settings


def read(settings: Settings, call: Any) -> Any:
    async def go() -> Any:
        client = settings.async_redis()
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_the_overview_agrees_with_the_status_reader(sandbox: SandboxThread, redis_url: str) -> None:
    held = scope_dead_letters(sandbox, redis_url)  # default: held, 2 dead letters
    enqueue(make_settings(sandbox, redis_url), events(7, prefix="q-"))
    other = held.keys.for_destination("brand-b")  # no consumer group yet

    async def in_flight(client: Any) -> None:
        queue = Queue(client, held.keys)
        await queue.ensure_group()
        await queue.read("console-test", 3)  # 3 of 7 read, not acknowledged

    read(held, in_flight)
    sync = redis.Redis.from_url(redis_url)
    sync.xadd(other.stream, {"e": b"{}", "t": 0, "i": "x"})
    sync.hset(other.endpoint, mapping={"failing_since": int(time.time() * 1000) - 5000})
    sync.close()
    names = ["default", "brand-b", "never-used"]
    both = read(held, lambda c: status.overview(c, held.keys, names))
    for name in names:
        one = read(
            held, lambda c, n=name: status.destination_status(c, held.keys.for_destination(n))
        )
        row = both[name]
        for field in ("queued", "in_flight", "retry_batches_scheduled", "counters", "dead_letters"):
            assert row[field] == one[field], (name, field)
        assert row["key"] == one["key"] and row["endpoint"] == one["endpoint"], name
        assert (row["oldest_queued_age_s"] is None) == (one["oldest_queued_age_s"] is None)
    assert both["default"]["queued"] == 4 and both["default"]["in_flight"] == 3
    assert both["default"]["key"]["state"] == "held" and both["default"]["dead_letters"] == 2
    assert both["brand-b"]["queued"] == 1 and both["brand-b"]["endpoint"]["state"] == "failing"


def test_dead_letters_are_paged_newest_first_filtered_and_found_by_id(
    sandbox: SandboxThread, redis_url: str
) -> None:
    settings = make_settings(sandbox, redis_url)
    n = 130
    ids = [f"o-{i}" for i in range(n - 1)] + ["a*[b]?"]
    reasons = [Reason.INVALID_EVENT if i % 3 else Reason.MISSING_SCOPE for i in range(n)]
    base = 1_800_000_000_000
    at_ms = [base + (i // 2) for i in range(n)]  # pairs share a millisecond
    seed_dead_letters(settings, ids[:-1], reasons[:-1], at_ms[:-1])
    custom = {"type": "custom", "custom_event_name": "quote_requested", "data": {"type": "custom"}}
    seed_dead_letters(settings, ids[-1:], reasons[-1:], at_ms[-1:], custom=custom)

    def page(**kw: Any) -> deadletters.Page:
        return read(settings, lambda c: deadletters.page(c, settings.keys, limit=50, **kw))

    seen: list[str] = []
    at: int | None = 0
    while at is not None:
        found = page(at=at)
        assert found.total == n
        seen += [r.id for r in found.records]
        at = found.next_at
    assert sorted(seen) == sorted(ids) and len(seen) == n  # each once
    times = [r.dead_lettered_ms for r in page().records]
    assert times == sorted(times, reverse=True)
    scoped = page(reasons=["missing_scope"])
    assert scoped.records and all(r.reason is Reason.MISSING_SCOPE for r in scoped.records)
    assert len(scoped.records) == len([r for r in reasons if r is Reason.MISSING_SCOPE])
    window = page(since_ms=base + 10, until_ms=base + 19)
    assert window.total == 20 and {r.dead_lettered_ms for r in window.records} <= set(
        range(base + 10, base + 20)
    )
    hostile = read(settings, lambda c: deadletters.find_by_id(c, settings.keys, "a*[b]?"))
    assert [r.key for r in hostile] == ["quote_requested:a*[b]?"]  # found by the scan
    assert read(settings, lambda c: deadletters.find_by_id(c, settings.keys, "o-1*")) == []


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        ({"user": {"emails_sha256": ["a" * 64]}}, {"user": {"emails_sha256": [HIDDEN_HASH]}}),
        ({"user": {"ip_address": "203.0.113.9"}}, {"user": {"ip_address": HIDDEN}}),
        ({"oppref": "click-1", "id": "x"}, {"oppref": HIDDEN, "id": "x"}),
        ({"data": {"contents": [{"id": "sku"}]}}, {"data": {"contents": [{"id": "sku"}]}}),
    ],
)  # fmt: skip
def test_events_are_masked_before_any_page_shows_them(
    event: dict[str, Any], shown: dict[str, Any]
) -> None:
    assert masked(event) == shown


def test_a_removed_destination_still_holding_dead_letters_shows_as_removed(
    sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    held = scope_dead_letters(sandbox, redis_url)  # under "default", before the file
    file = tmp_path / "destinations.toml"
    file.write_text(
        '[destinations.brand-a]\npixel_id = "sandbox-pixel-00000001"\n'
        'api_key_env = "CAPI_KEY_BRAND_A"\n'
        f'base_url = "{sandbox.url}"\n'
    )
    tokens = new_tokens()
    url = start_console(
        held,
        tokens,
        tmp_path / "console.log",
        CAPI_DESTINATIONS_FILE=str(file),
        CAPI_KEY_BRAND_A="sk-svcacct-sandbox-conversion-key-0001",
    )
    bearer = {"Authorization": f"Bearer {tokens.viewer}"}
    rows = httpx_get(url + "/overview.json", headers=bearer).json()["destinations"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["brand-a"]["configured"] and not by_name["default"]["configured"]
    assert by_name["default"]["dead_letters"] == 2
    page = httpx_get(url + "/", headers=bearer).text
    assert "removed, still holding events" in page
    assert httpx_get(url + "/d/default/dead-letters", headers=bearer).status_code == 200
