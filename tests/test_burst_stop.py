"""A burst worker that is stopped (SIGTERM, or giving up on a Redis that does not answer)
never says it drained: its events stay queued, and its log says so."""

from __future__ import annotations

import asyncio
import logging

import pytest

from capi.sandbox import SandboxThread
from capi.worker.housekeeping import Housekeeping
from capi.worker.lanes import Lanes
from capi.worker.sender import Sender
from tests.helpers import enqueue, events, make_settings


def test_a_stopped_burst_worker_does_not_say_nothing_is_queued(
    redis_url: str, sandbox: SandboxThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in a fault campaign: a burst worker that gave up on Redis took its senders off
    the lanes; housekeeping then found no sender with anything queued and logged 'burst:
    nothing queued, in flight or scheduled' right before 'error: ... queued events stay
    queued' (2,050 were)."""
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(10))

    async def go() -> None:
        sender = Sender.from_settings(settings)
        lanes = Lanes(settings, sender.redis, name=sender.name, metrics=sender.metrics.parent)
        try:
            await sender.start()
            lanes.add(sender)
            await lanes.remove(sender)  # what a stop does: in-flight batches finish, no more
            with caplog.at_level(logging.INFO, "capi.housekeeping"):
                await Housekeeping(lanes, burst=True).tick()
        finally:
            await sender.aclose()

    asyncio.run(go())
    assert "nothing queued" not in caplog.text
    assert not sandbox.state.delivered_ids()  # the ten are still queued, none was sent
