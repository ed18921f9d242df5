"""``capi dead-letters replay --dry-run`` asks the API the way a worker sends: requests
within the contract's limits, over real HTTP (a scripted imitation of the endpoint)."""

from __future__ import annotations

import asyncio
import time

from capi import deadletters
from capi.client import ConversionsClient
from capi.constants import API_MAX_BODY_BYTES, API_MAX_EVENTS_PER_REQUEST
from capi.events import prepare
from capi.failures import Reason
from capi.queue import Entry
from capi.replay import dry_run
from tests.endpoint_helpers import Endpoint, endpoint

__all__ = ["endpoint"]  # a fixture


def big_dead_letters(count: int, blob_chars: int) -> list[deadletters.DeadLetter]:
    """``count`` dead letters of custom events carrying ``blob_chars`` characters each."""
    now = int(time.time() * 1000)
    out = []
    for n in range(count):
        raw = {
            "id": f"big-{n}",
            "type": "custom",
            "custom_event_name": "quote_sent",
            "timestamp_ms": now,
            "data": {"type": "custom", "note": "é" * blob_chars},  # 2 bytes each in UTF-8
        }
        prepared = prepare(raw)
        entry = Entry(b"0-0", prepared.json, prepared.id, prepared.timestamp_ms, 3)
        out.append(
            deadletters.build(
                entry,
                reason=Reason.SERVER_ERROR,
                guidance="",
                error=None,
                key_fingerprint="fp",
                pixel_id="p",
                now_ms=now,
                attempted=True,
            )
        )
    return out


def test_a_dry_run_never_sends_a_body_over_the_cap(endpoint: Endpoint) -> None:
    # 1000 events of ~5 KB: one request by count, but 5 MB, over the 4 MB integrators cap
    # at (the contract: max body size unknown). The worker splits by size; so must this.
    records = big_dead_letters(API_MAX_EVENTS_PER_REQUEST, 2_500)

    async def go() -> list[bool]:
        async with ConversionsClient(base_url=endpoint.url, api_key="k", pixel_id="p") as c:
            return [r.accepted for r in await dry_run(c, records)]

    assert all(asyncio.run(go()))
    assert all(r.validate_only for r in endpoint.requests)
    assert sorted(i for r in endpoint.requests for i in r.ids) == sorted(r.id for r in records)
    sizes = [r.size for r in endpoint.requests]
    assert max(sizes) <= API_MAX_BODY_BYTES, sizes
    assert len(sizes) <= 3, sizes  # split by size, not one event per request
