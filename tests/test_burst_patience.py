"""A burst worker's patience with Redis (capi/worker/runner.py, _give_up_without_redis),
on a real Redis that is killed and started again, on a clock of the test's own: the
watch's pause between PINGs moves that clock, so where an outage falls among the PINGs is
chosen, not raced."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from capi.errors import QueueUnavailable
from capi.settings import Settings
from capi.worker import runner
from tests.redisproc import RedisProcess


class Outage:
    """The test's clock and Redis: ``redis`` is killed once the clock passes ``down`` and
    started again once it passes ``up`` (never, if None). Each pause of the watch moves
    the clock on by the pause it asked for; after ``until`` the test is told."""

    def __init__(self, rp: RedisProcess, down: float, up: float | None, until: float) -> None:
        self.rp, self.down, self.up, self.until = rp, down, up, until
        self.now = 0.0
        self.over = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        running = self.rp.proc is not None and self.rp.proc.poll() is None
        away = self.down <= self.now and (self.up is None or self.now < self.up)
        if away and running:
            self.rp.kill()
        elif not away and not running:
            self.rp.start()
        if self.now >= self.until:
            self.over.set()
        await asyncio.sleep(0)


class Fleet:
    def __init__(self, settings: Settings) -> None:
        self.redis = settings.async_redis()
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


@pytest.fixture
def rp(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path) as server:
        yield server


def watch(rp: RedisProcess, monkeypatch: pytest.MonkeyPatch, outage: Outage) -> Any:
    """Run the watch (patience 1 s) until it gives up or the outage's clock is over: what
    it gave up with (None: it did not), and how often it stopped the fleet."""
    settings = Settings.load(os.devnull, redis_url=rp.url, redis_timeout_s=1)
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=outage.monotonic))
    monkeypatch.setattr(
        runner, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": outage.sleep})
    )

    async def go() -> tuple[QueueUnavailable | None, int]:
        fleet = Fleet(settings)
        task = asyncio.create_task(runner._give_up_without_redis(fleet, settings))  # type: ignore[arg-type]
        over = asyncio.create_task(outage.over.wait())
        await asyncio.wait({task, over}, return_when=asyncio.FIRST_COMPLETED)
        over.cancel()
        task.cancel()
        await asyncio.gather(task, over, return_exceptions=True)
        await fleet.redis.aclose()
        return (None if task.cancelled() else task.result()), fleet.stopped

    return asyncio.run(go())


def test_a_burst_does_not_give_up_on_redis_away_for_less_than_its_timeout(
    rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away for 0.7 s of CAPI_REDIS_TIMEOUT_S=1 (two PINGs unanswered, 0.5 s apart):
    the burst gave up (exit 5) as if it had been away for 1 s, counting from the last PING
    answered, before Redis went away, not from the first one left unanswered."""
    gave_up, stops = watch(rp, monkeypatch, Outage(rp, down=0.9, up=1.6, until=4.0))
    assert gave_up is None and stops == 0, gave_up


def test_a_burst_gives_up_on_redis_away_for_its_timeout(
    rp: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    gave_up, stops = watch(rp, monkeypatch, Outage(rp, down=0.9, up=None, until=10.0))
    assert isinstance(gave_up, QueueUnavailable) and stops == 1
    assert f"Redis at 127.0.0.1:{rp.port} could not be reached" in str(gave_up)
    assert "gave up after 1 s (CAPI_REDIS_TIMEOUT_S)" in str(gave_up)
