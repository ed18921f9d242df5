"""Dead letters by the thousand: the commands and the worker's prune job read them a slice
at a time, never every record at once (at 200,000 dead letters a `list --limit 10` took
1 GB), and finding one by its event id reads only the index's matching names."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner

from capi import deadletters
from capi.cli import cli
from capi.cli.selection import select_records
from capi.events import prepare
from capi.failures import Reason
from capi.queue import Entry
from capi.replay import Selection
from capi.sandbox import SandboxThread
from capi.settings import Settings
from capi.worker.housekeeping import prune_dead_letters
from capi.worker.sender import Sender
from tests.helpers import events, make_settings
from tests.test_deadletters_cli import cli_env, cli_run

FEW = 600
MORE = 2400
REASONS = [Reason.MISSING_SCOPE, Reason.SERVER_ERROR, Reason.INVALID_EVENT]
DAY_MS = 86_400_000


def store(settings: Settings, count: int, *, age_ms: int = 0, destination: str = "default") -> None:
    """``count`` dead letters written as a worker writes them (deadletters.write), the
    newest ``age_ms`` ago, one second apart."""
    keys = settings.keys.for_destination(destination)

    async def go() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        now = int(time.time() * 1000) - age_ms
        evts = events(count, prefix=f"dl{age_ms}{destination}-")
        try:
            for start in range(0, count, 500):
                records = []
                for n, event in enumerate(evts[start : start + 500], start):
                    prepared = prepare(event)  # as a producer stores it
                    entry = Entry(b"0-0", prepared.json, prepared.id, prepared.timestamp_ms, 3)
                    records.append(
                        deadletters.build(
                            entry,
                            reason=REASONS[n % len(REASONS)],
                            guidance="fix it, then replay",
                            error=None,
                            key_fingerprint="fp",
                            pixel_id=settings.pixel_id or "",
                            now_ms=now - n * 1000,
                            attempted=True,
                        )
                    )
                await deadletters.write(client, keys, "senders", [], records, dedup_window_s=86_400)
        finally:
            await client.aclose()

    asyncio.run(go())


def peak_of(call: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def grows(settings: Settings, call: Callable[[], Any], check: Callable[[Any, int], None]) -> None:
    """Run ``call`` over FEW dead letters, then over FEW + MORE (five times as many): the
    memory it peaks at must not grow with them (it holds a slice, not all)."""
    call()  # warm: lazy imports and caches are not the records
    result, few = peak_of(call)
    check(result, FEW)
    store(settings, MORE, age_ms=DAY_MS)  # older than the first ones
    result, many = peak_of(call)
    check(result, FEW + MORE)
    assert many < 2 * few, f"peak {few:,} B over {FEW} dead letters, {many:,} B over {FEW + MORE}"


@pytest.fixture
def few(redis_url: str, sandbox: SandboxThread) -> Settings:
    settings = make_settings(sandbox, redis_url)
    store(settings, FEW)
    return settings


def test_list_with_a_limit_holds_a_slice_not_every_record(few: Settings) -> None:
    def check(result: Any, count: int) -> None:
        assert result.exit_code == 0, result.output
        rows = [line for line in result.stdout.splitlines() if "dl0default-" in line]
        assert len(rows) == 5
        # The summary still counts every dead letter, by reason.
        assert f"{count} dead letters: missing_scope {count // 3}" in result.stdout

    grows(few, lambda: cli_run(few, "dead-letters", "list", "--limit", "5"), check)


def test_export_writes_as_it_reads(few: Settings, tmp_path: Any) -> None:
    out = tmp_path / "all.jsonl"

    def check(result: Any, count: int) -> None:
        assert result.exit_code == 0, result.output
        rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert len({r["key"] for r in rows}) == len(rows) == count
        times = [r["dead_lettered_ms"] for r in rows]
        assert times == sorted(times, reverse=True)  # newest first
        assert f"exported {count} dead letters" in result.stderr

    grows(few, lambda: cli_run(few, "dead-letters", "export", "-o", str(out)), check)


def test_show_by_event_id_reads_the_matching_names_only(few: Settings) -> None:
    def check(result: Any, count: int) -> None:
        assert result.exit_code == 0, result.output
        assert "order_created:dl0default-p-100" in result.stdout

    grows(few, lambda: cli_run(few, "dead-letters", "show", "dl0default-p-100"), check)


def test_list_json_across_destinations_is_newest_first(
    tmp_path: Any, redis_url: str, sandbox: SandboxThread
) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(
        "".join(
            f'[destinations.{n}]\npixel_id = "{n}-pixel"\napi_key_env = "CAPI_API_KEY"\n\n'
            for n in ("a", "b", "c")
        )
    )
    for n, age in (("a", 0), ("b", 500), ("c", 250)):
        store(make_settings(sandbox, redis_url), 450, age_ms=age, destination=n)
    env = {**cli_env(make_settings(sandbox, redis_url)), "CAPI_DESTINATIONS_FILE": str(path)}
    result = CliRunner().invoke(cli, ["dead-letters", "list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len({(r["destination"], r["key"]) for r in rows}) == len(rows) == 3 * 450
    assert {r["destination"] for r in rows} == {"a", "b", "c"}
    times = [r["dead_lettered_ms"] for r in rows]
    assert times == sorted(times, reverse=True)


def test_the_prune_job_holds_a_slice_and_names_a_bounded_number_of_ids(
    redis_url: str, sandbox: SandboxThread, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(sandbox, redis_url, deadletter_retention_days=1)
    store(settings, 100)  # kept

    async def prune() -> None:
        sender = Sender.from_settings(settings)
        try:
            await prune_dead_letters(sender, int(time.time() * 1000))
        finally:
            await sender.aclose()

    caplog.set_level(logging.WARNING)
    peaks = []
    for count in (FEW, FEW + MORE):
        store(settings, count, age_ms=2 * DAY_MS)  # past retention: pruned
        caplog.clear()
        peaks.append(peak_of(lambda: asyncio.run(prune()))[1])
        with redis.Redis.from_url(redis_url) as client:
            assert client.hlen(settings.keys.deadletters) == 100
            assert client.zcard(settings.keys.deadletter_index) == 100
        [pruned] = [r for r in caplog.records if "pruned" in r.getMessage()]
        assert f"pruned {count} dead letters" in pruned.getMessage()
        assert pruned.count == count  # type: ignore[attr-defined]
        assert len(pruned.event_ids) == 100  # type: ignore[attr-defined]
    few, many = peaks
    assert many < 2 * few, f"peak {few:,} B over {FEW} dead letters, {many:,} B over {FEW + MORE}"


def test_a_dry_run_sorts_its_records_in_one_pass(
    few: Settings, sandbox: SandboxThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run set the expired records apart by a membership test per record: comparing
    records pairwise, 50,000 dead letters never reached the API in ten minutes."""
    compared = [0]
    equal = deadletters.DeadLetter.__eq__

    def counting(self: deadletters.DeadLetter, other: object) -> bool:
        compared[0] += 1
        return equal(self, other)

    monkeypatch.setattr(deadletters.DeadLetter, "__eq__", counting)
    result = cli_run(few, "dead-letters", "replay", "--all", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == FEW and all(r["accepted"] for r in rows)
    assert sandbox.state.validate_only_requests == 1
    assert compared[0] <= FEW, f"{compared[0]:,} comparisons of records for {FEW}"


def test_replay_and_purge_hold_outlines_not_events(few: Settings, tmp_path: Any) -> None:
    """A replay or a purge held every selected record whole (50,000 dead letters: 384 MB);
    it keeps only what it acts on (key, deadline), Redis keeping the events, so its peak is
    a small part of what the records themselves take, and nothing is lost on the way."""

    store(few, MORE, age_ms=DAY_MS)
    count = FEW + MORE

    def select_all() -> list[deadletters.DeadLetter]:
        return asyncio.run(select_records(few, Selection()))

    select_all()  # warm: lazy imports and caches are not the records
    records, whole = peak_of(select_all)
    assert len(records) == count
    del records

    out = tmp_path / "purged.jsonl"
    result, purging = peak_of(
        lambda: cli_run(
            few, "dead-letters", "purge", "--reason", "invalid_event", "--export", str(out), "--yes"
        )
    )
    assert result.exit_code == 0, result.output
    purged = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(purged) == count // 3 and all(r["event"]["id"] for r in purged)
    assert f"purged {count // 3} dead letters" in result.stdout

    result, replaying = peak_of(lambda: cli_run(few, "dead-letters", "replay", "--all"))
    assert result.exit_code == 0, result.output
    assert f"replayed {count - count // 3} of {count - count // 3} selected" in result.stdout
    with redis.Redis.from_url(few.redis_url) as client:
        assert client.hlen(few.keys.deadletters) == 0
        assert client.xlen(few.keys.stream) == count - count // 3
    for peak in (purging, replaying):
        assert peak < whole / 4, f"peak {peak:,} B; the {count} records whole: {whole:,} B"
