"""What each console page shows, read through the library's readers.

Nothing here writes to Redis. Events are masked before a template sees them: every
``*_sha256`` value and every other identifier (the ``user`` fields, ``oppref``) is
replaced by a placeholder, as are the values of a custom event's own ``data`` fields;
text from outside (the API's messages, request ids) has what looks like an email address,
a phone number or a SHA-256 replaced (:func:`redacted`). No page should ever hold a raw
identifier or its hash.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

from capi import deadletters, destinations, replay, status, tail
from capi.deadletters import DeadLetter, Unreadable
from capi.destinations import Destination
from capi.failures import Reason
from capi.reproduce import cli_target, curl_for, key_expression
from capi.schema import CustomData
from capi.settings import Settings

HIDDEN_HASH = "sha256:…(64 hex, hidden)"
HIDDEN = "(hidden)"
HIDDEN_PHONE = "(phone hidden)"
PAGE_SIZE = 50
TAIL_LINES = 50
REASONS = tuple(r.value for r in Reason)
SCAN_EVERY_S = 30.0  # how often the overview looks for removed destinations


SEARCH_NEWEST = 10_000  # a search by id looks through this many newest dead letters
CUSTOM_DATA_SHOWN = frozenset(CustomData.model_fields)  # the rest may be anything
_IDENTIFIERS = [
    (re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+"), "(email hidden)"),
    (re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])"), HIDDEN_HASH),
    # a phone: +digits (E.164, separators allowed), or groups such as (415) 555-0100; a bare
    # run of digits stays (timestamps and counts in error messages read as such), as do dates
    (re.compile(r"\+[0-9](?:[ ().-]?[0-9]){6,14}(?![0-9])"), HIDDEN_PHONE),
    (re.compile(r"(?<![\w.+-])\(?[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}(?![\w-])"), HIDDEN_PHONE),
]


def redacted(text: object) -> str:
    """Text from outside (an API's error message, a request id) with what looks like an
    email address, a phone number or a SHA-256 replaced by a placeholder."""
    out = str(text)
    for pattern, placeholder in _IDENTIFIERS:
        out = pattern.sub(placeholder, out)
    return out


def shown_line(line: tail.Line) -> dict[str, Any]:
    """A recent outcome as the pages show it: its request id (from outside) redacted."""
    row = line.json()
    if "request_id" in row:
        row["request_id"] = redacted(row["request_id"])
    return row


def masked(value: Any, name: str = "") -> Any:
    """An event (or part of one) with every identifier and hash replaced by a placeholder:
    ``*_sha256`` values, everything under ``user`` and ``oppref``, and the values of a
    custom event's extra ``data`` fields (only their names are shown)."""
    if name == "data" and isinstance(value, dict) and value.get("type") == "custom":
        return {k: masked(v, k) if k in CUSTOM_DATA_SHOWN else HIDDEN for k, v in value.items()}
    if name.endswith("_sha256"):
        return [HIDDEN_HASH for _ in value] if isinstance(value, list) else HIDDEN_HASH
    if name == "user" and isinstance(value, dict):
        return {k: masked(v, k) if k.endswith("_sha256") else HIDDEN for k, v in value.items()}
    if name == "oppref":
        return HIDDEN
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, name) for v in value]
    return value


@dataclass
class Rates:
    """Delivered per minute, from the console's own samples of each destination's
    ``delivered`` counter (taken whenever the overview is read): shown once two samples
    at least 5 s apart exist within the last two minutes."""

    monotonic: Callable[[], float] = time.monotonic
    _samples: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def per_minute(self, name: str, delivered: int) -> float | None:
        """Record a sample; the rate over the samples of the last two minutes."""
        now = self.monotonic()
        seen = self._samples.setdefault(name, deque())
        while seen and seen[0][0] < now - 120:
            seen.popleft()
        if not seen or now - seen[-1][0] >= 1:
            seen.append((now, delivered))
        first_at, first = seen[0]
        if now - first_at < 5:
            return None
        return round(max(0, delivered - first) * 60 / (now - first_at), 1)


class Reader:
    """The console's reads: one per page, each through the library."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = settings.keys
        self.rates = Rates()
        self._stamp: Any = ()
        self._configured: dict[str, Destination] = {}
        self._in_redis: list[str] = []
        self._scanned_at = float("-inf")

    def configured(self) -> dict[str, Destination]:
        """The configured destinations, read again when the destinations file changes
        (keys this host cannot read are left empty)."""
        stamp = destinations.file_stamp(self.settings)
        if stamp != self._stamp or not self._configured:
            self._configured = destinations.parse_file(self.settings)
            self._stamp = stamp
        return self._configured

    async def in_redis(self) -> list[str]:
        """Every destination with keys in Redis, found by a scan of the keyspace at most
        every :data:`SCAN_EVERY_S` (a removed destination shows up that much later)."""
        now = time.monotonic()
        if now - self._scanned_at >= SCAN_EVERY_S:
            self._in_redis = await status.destinations_in_redis(self.redis, self.keys)
            self._scanned_at = now
        return self._in_redis

    async def known(self, name: str) -> bool:
        """Whether a destination is configured, or still has keys in Redis."""
        if name in self.configured():
            return True
        return bool(await self.redis.exists(self.keys.for_destination(name).stats))

    async def overview(self) -> dict[str, Any]:
        """Every destination (and every removed one still holding events), with its key
        state, queue, rates and dead letters; the workers alive."""
        configured = self.configured()
        names = sorted(configured)
        others = [n for n in await self.in_redis() if n not in configured]
        rows = await status.overview(self.redis, self.keys, names + others)
        removed = {n: rows.pop(n) for n in others}
        removed = {n: r for n, r in removed.items() if any(r[w] for w in status.WAITING)}
        shared = await status.shared_status(self.redis, self.keys)
        workers: dict[str, int] = {}
        for w in shared["workers"]:
            workers[w["destination"]] = workers.get(w["destination"], 0) + 1
        out = []
        for name, row in [*rows.items(), *removed.items()]:
            delivered = row["counters"].get("delivered", 0)
            key = row["key"]
            held = key.get("state") == "held"
            out.append(
                {
                    "name": name,
                    "configured": name in configured,
                    "pixel_id": configured[name].pixel_id if name in configured else "",
                    "key_state": key.get("state", "unchecked"),
                    "key_reason": key.get("reason") or key.get("confirming_reason") or "",
                    "diagnosis": redacted(key.get("guidance", "") if held else ""),
                    "queued": row["queued"],
                    "in_flight": row["in_flight"],
                    "oldest_age_s": row["oldest_queued_age_s"],
                    "delivered": delivered,
                    "delivered_per_min": self.rates.per_minute(name, delivered),
                    "retries": row["retry_batches_scheduled"],
                    "dead_letters": row["dead_letters"],
                    "endpoint": row["endpoint"]["state"],
                    "endpoint_error": redacted(row["endpoint"]["last_error"] or ""),
                    "workers": workers.get(name, 0),
                }
            )
        return {"destinations": out, "workers_alive": len(shared["workers_alive"])}

    async def destination(self, name: str) -> dict[str, Any]:
        """One destination's status (with match coverage) and its recent outcomes."""
        keys = self.keys.for_destination(name)
        found = await status.destination_status(self.redis, keys)
        # Both quote the API (or a proxy), as the overview's diagnosis and endpoint error do.
        if found["key"].get("guidance"):
            found["key"]["guidance"] = redacted(found["key"]["guidance"])
        if found["endpoint"].get("last_error"):
            found["endpoint"]["last_error"] = redacted(found["endpoint"]["last_error"])
        lines, newest = await tail.recent(self.redis, {name: keys.tail}, TAIL_LINES)
        dest = self.configured().get(name)
        return {
            "name": name,
            "configured": dest is not None,
            "pixel_id": dest.pixel_id if dest else "",
            "key_fingerprint": dest.key_fingerprint if dest and dest.api_key else "",
            "status": found,
            "tail": [shown_line(line) for line in reversed(lines)],
            "after": newest.get(keys.tail, "0-0"),
        }

    async def tail_after(self, name: str, after: str) -> dict[str, Any]:
        """The outcomes written after the ring entry ``after`` (for the live page)."""
        keys = self.keys.for_destination(name)
        rows = await self.redis.xrange(keys.tail, f"({after}" if after != "0-0" else "-", "+")
        lines = [line for sid, fields in rows for line in tail.lines(name, sid, fields)]
        last = rows[-1][0].decode() if rows else after
        return {"after": last, "lines": [shown_line(line) for line in lines]}

    async def dead_letters(
        self,
        name: str,
        *,
        at: int = 0,
        reasons: Sequence[str] = (),
        since_ms: int | None = None,
        until_ms: int | None = None,
        search: str = "",
    ) -> dict[str, Any]:
        """A page of a destination's dead letters (or those whose id is ``search``)."""
        keys = self.keys.for_destination(name)
        searched = 0  # when a search looked through only the newest this many
        previous = 0
        if search:
            found = await deadletters.find_by_id(self.redis, keys, search, newest=SEARCH_NEWEST)
            records = [r for r in found if isinstance(r, DeadLetter)]
            unreadable = [r for r in found if isinstance(r, Unreadable)]
            total, next_at = len(records), None
            if not found and await self.redis.zcard(keys.deadletter_index) > SEARCH_NEWEST:
                searched = SEARCH_NEWEST
        else:
            page = await deadletters.page(
                self.redis,
                keys,
                at=at,
                limit=PAGE_SIZE,
                since_ms=since_ms,
                until_ms=until_ms,
                reasons=reasons,
            )
            previous = await deadletters.previous_at(
                self.redis,
                keys,
                at,
                limit=PAGE_SIZE,
                since_ms=since_ms,
                until_ms=until_ms,
                reasons=reasons,
            )
            records, unreadable, total, next_at = (
                page.records,
                page.unreadable,
                page.total,
                page.next_at,
            )
        now = int(time.time() * 1000)
        return {
            "rows": [
                {
                    "key": r.key,
                    "id": r.id,
                    "type": r.event_type,
                    "reason": r.reason.value,
                    "at": r.dead_lettered_at,
                    "attempts": r.attempts,
                    "replayable": replay.can_replay(r, now),
                }
                for r in records
            ],
            "unreadable": [u.key for u in unreadable],
            "total": total,
            "next_at": next_at,
            "previous_at": previous if not search and at > 0 else None,
            "searched_newest": searched,
        }

    async def dead_letter(self, name: str, key: str) -> dict[str, Any] | None:
        """Everything about one dead letter, identifiers masked; None when there is none."""
        keys = self.keys.for_destination(name)
        found = await deadletters.find_by_id(self.redis, keys, key, limit=1, newest=SEARCH_NEWEST)
        if not found:
            return None
        record = found[0]
        command = cli_target(record.key, name)
        if isinstance(record, Unreadable):
            return {"unreadable": True, "key": record.key, "why": record.why, "command": command}
        shown = masked(record.event)
        dest = self.configured().get(name)
        expression, env_file = key_expression(self.settings, dest.key_source if dest else "")
        base_url = dest.base_url if dest else self.settings.base_url
        stand_in = record.model_copy(update={"event_json": orjson.dumps(shown).decode()})
        now = int(time.time() * 1000)
        return {
            "unreadable": False,
            "record": record,
            "event": orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode(),
            "curl": curl_for(stand_in, base_url, expression, env_file),
            "replayable": replay.can_replay(record, now),
            "command": command,
            "error_message": redacted(record.error_message or ""),
            "error_code": redacted(record.error_code or ""),
            "error_param": redacted(record.error_param or ""),
            "request_ids": {k: redacted(v) for k, v in sorted(record.request_ids.items())},
            "guidance": redacted(record.guidance),
        }

    async def audit(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The destination's replay and purge audit, newest first, times as text."""
        entries = await replay.audit(self.redis, self.keys.for_destination(name), limit)
        for entry in entries:
            entry["at"] = datetime.fromtimestamp(entry["at_ms"] / 1000, UTC).isoformat(
                timespec="seconds"
            )
            entry["selection_text"] = " ".join(
                f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in entry.get("selection", {}).items()
            ) or ("-" if entry.get("action") == "key check" else "all")
        return entries
