"""Select, replay, dry-run, export and purge dead letters.

Replay puts each selected event back on the stream with a fresh attempt budget and the
same event id (so the API dedups), and removes its dead letter in the same Lua script:
a dead letter disappears only once its event is safely queued, a repeated replay finds
nothing left to send, and an interrupted replay resumes by running it again. Each replay
leaves audit entries (``{d}:dl:replays``), and so do a purge and a key check the console
asks for; an
entry names who asked (``by``: a console token's fingerprint) when the console asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from capi import clock, deadletters, queue
from capi._aio import aw
from capi.batches import by_size, drop_rejected
from capi.client import ConversionsClient
from capi.constants import API_MAX_BODY_BYTES, API_MAX_EVENTS_PER_REQUEST, RedisKeys
from capi.deadletters import DeadLetter, Outline
from capi.errors import InvalidEventError, SendError


@dataclass
class Selection:
    """Which dead letters an operator means; empty fields select everything."""

    ids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    since_ms: int | None = None
    until_ms: int | None = None
    replayable: bool | None = None
    destinations: list[str] = field(default_factory=list)

    def matches(self, record: DeadLetter, now_ms: int) -> bool:
        """Whether a record is selected."""
        checks = [
            not self.ids or record.id in self.ids or record.key in self.ids,
            not self.reasons or record.reason.value in self.reasons,
            not self.event_types or record.event_type in self.event_types,
            self.since_ms is None or record.dead_lettered_ms >= self.since_ms,
            self.until_ms is None or record.dead_lettered_ms <= self.until_ms,
            self.replayable is None or can_replay(record, now_ms) == self.replayable,
        ]
        return all(checks)

    def describe(self) -> dict[str, Any]:
        """The selection as JSON-ready data (for the audit log)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


def can_replay(record: DeadLetter | Outline, now_ms: int) -> bool:
    """Whether the API can still accept the event (reason allows it, deadline not passed)."""
    return record.reason.replayable and record.replay_deadline_ms > now_ms


async def select(
    client: aioredis.Redis,
    keys: RedisKeys,
    selection: Selection,
    now_ms: int,
    unreadable: list[deadletters.Unreadable] | None = None,
) -> list[DeadLetter]:
    """The selected dead letters, newest first; records that cannot be read are skipped
    and added to ``unreadable`` (if given)."""
    if selection.ids:
        found = {
            r.key: r
            for ref in selection.ids
            for r in await deadletters.find(client, keys, ref, unreadable)
        }
        records = sorted(found.values(), key=lambda r: -r.dead_lettered_ms)
        return [r for r in records if selection.matches(r, now_ms)]
    # Read a slice at a time: only the selected records are kept.
    return [
        r
        async for r in deadletters.scan(
            client,
            [(keys.destination, keys)],
            since_ms=selection.since_ms,
            until_ms=selection.until_ms,
            unreadable=unreadable,
        )
        if selection.matches(r, now_ms)
    ]


@dataclass
class ReplayReport:
    """What a replay did."""

    selected: int = 0
    replayed: int = 0
    already_gone: int = 0
    expired: list[str] = field(default_factory=list)


async def replay(
    client: aioredis.Redis,
    keys: RedisKeys,
    records: Sequence[DeadLetter | Outline],
    *,
    rate_per_s: float | None = None,
    include_expired: bool = False,
    selection: Selection | None = None,
    now_ms: int | None = None,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    actor: str | None = None,
) -> ReplayReport:
    """Put records' events back on the queue at most ``rate_per_s`` per second; the audit
    entries name ``actor`` (who asked: a console token's fingerprint, or ``cli:user@host``)
    when given."""
    now_ms = now_ms if now_ms is not None else clock.now_ms()
    report = ReplayReport(selected=len(records))
    todo = []
    for r in records:
        if can_replay(r, now_ms) or include_expired:
            todo.append(r)
        else:
            report.expired.append(r.id)
    audit = {
        "at_ms": now_ms,
        "selection": (selection or Selection()).describe(),
        "selected": len(records),
        "status": "started",
        **({"by": actor} if actor else {}),
    }
    await aw(client.lpush(keys.replays, orjson.dumps(audit)))
    chunk = 100 if not rate_per_s else max(1, min(100, int(rate_per_s / 10) or 1))
    started = monotonic()
    for i in range(0, len(todo), chunk):
        ids = [r.key for r in todo[i : i + chunk]]
        done = await queue.requeue_dead_letters(client, keys, ids)
        report.replayed += len(done)
        report.already_gone += len(ids) - len(done)
        if progress:
            progress(len(ids))
        if rate_per_s:
            ahead = (i + len(ids)) / rate_per_s - (monotonic() - started)
            if ahead > 0:
                await sleep(ahead)
    audit.update(
        status="completed",
        replayed=report.replayed,
        expired=len(report.expired),
        already_gone=report.already_gone,
    )
    await _audit(client, keys, audit)
    return report


AUDIT_ENTRIES = 1000  # the audit list keeps this many newest entries per destination


async def _audit(client: aioredis.Redis, keys: RedisKeys, entry: dict[str, Any]) -> None:
    await aw(client.lpush(keys.replays, orjson.dumps(entry)))
    await aw(client.ltrim(keys.replays, 0, AUDIT_ENTRIES - 1))


async def audit_key_check(
    client: aioredis.Redis,
    keys: RedisKeys,
    *,
    ok: bool,
    reason: str,
    by: str,
    now_ms: int | None = None,
) -> None:
    """Write a key check someone asked for (a console token's fingerprint) to the audit: a
    passing check releases a hold, so who released it is kept with the replays."""
    entry = {
        "at_ms": now_ms if now_ms is not None else clock.now_ms(),
        "action": "key check",
        "status": "key ok" if ok else "key failing",
        "reason": reason,
        "by": by,
    }
    await _audit(client, keys, entry)


async def audit(client: aioredis.Redis, keys: RedisKeys, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` entries of a destination's replay and purge audit, newest first."""
    return [orjson.loads(raw) for raw in await aw(client.lrange(keys.replays, 0, limit - 1))]


@dataclass
class DryRunResult:
    """What the API said of one dead letter's event under validate_only. ``checked`` is
    False when the API said nothing about the event (a 5xx, a 429, a lost answer, a key
    failure): not accepted, and not a rejection either."""

    id: str
    accepted: bool
    reason: str | None = None
    message: str = ""
    checked: bool = True


async def dry_run(client: ConversionsClient, records: Sequence[DeadLetter]) -> list[DryRunResult]:
    """Send the events with validate_only and report, per event, what the API would do."""
    results: dict[str, DryRunResult] = {}
    # The worker's limits: at most 1000 events and 4 MB a request (less room for the
    # envelope), so the dry run asks about the very requests a replay would make.
    work = by_size(
        records,
        lambda r: len(r.event_json.encode()),
        max_bytes=API_MAX_BODY_BYTES - 1024,
        max_count=API_MAX_EVENTS_PER_REQUEST,
    )
    while work:
        group = work.pop()
        try:
            await client.send([r.event_json.encode() for r in group], validate_only=True)
        except InvalidEventError as exc:
            bad, again = drop_rejected(group, exc.response.event_indexes)
            named = set(exc.response.event_indexes)
            for i in bad:
                own = exc.for_event(i) if i in named else exc  # its own reason
                results[group[i].key] = DryRunResult(
                    group[i].id, False, own.reason.value, exc.response.message
                )
            work += again
            continue
        except SendError as exc:  # about the request, the key or the API, not the events
            for r in group:
                results[r.key] = DryRunResult(
                    r.id, False, exc.reason.value, exc.response.message, checked=False
                )
            continue
        for r in group:
            results[r.key] = DryRunResult(r.id, True)
    return [results[r.key] for r in records]


async def purge(
    client: aioredis.Redis,
    keys: RedisKeys,
    records: Sequence[DeadLetter | Outline | deadletters.Unreadable],
    *,
    actor: str | None = None,
    selection: Selection | None = None,
    now_ms: int | None = None,
) -> int:
    """Delete dead letters (readable or not); return how many were removed. With ``actor``
    (who asked: a console token's fingerprint, or ``cli:user@host``) the purge is written to
    the audit."""
    if not records:
        return 0
    removed = await purge_keys(client, keys, [r.key for r in records])
    if actor:
        entry = {
            "at_ms": now_ms if now_ms is not None else clock.now_ms(),
            "action": "purge",
            "selection": (selection or Selection()).describe(),
            "selected": len(records),
            "status": "purged",
            "purged": int(removed),
            "by": actor,
        }
        await _audit(client, keys, entry)
    return int(removed)


PURGE_SLICE = 1000  # records deleted per transaction: Redis is never held long by one


async def purge_keys(client: aioredis.Redis, keys: RedisKeys, names: Sequence[str]) -> int:
    """Delete the dead letters stored under ``names`` (``name:id``) and their index
    entries, :data:`PURGE_SLICE` at a time, counting them as purged; return how many were
    removed."""
    removed = 0
    for start in range(0, len(names), PURGE_SLICE):
        part = names[start : start + PURGE_SLICE]
        # A cluster client has no MULTI (redis-py): there the index entry may briefly
        # outlive its record, which readers skip as gone.
        pipe = client.pipeline(transaction=not keys.cluster)
        pipe.hdel(keys.deadletters, *part)
        pipe.zrem(keys.deadletter_index, *part)
        found, _ = await pipe.execute()
        await aw(client.hincrby(keys.stats, "purged", int(found)))
        removed += int(found)
    return removed


def to_json_line(record: DeadLetter) -> bytes:
    """One dead letter as a JSON Lines row (for export and ``list --json``)."""
    return orjson.dumps(record.model_dump(mode="json")) + b"\n"
