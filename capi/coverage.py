"""Match coverage: which identifier kinds the delivered events carried, and how often.

The API attributes a conversion to an ad by matching it to a person; each identifier kind
is one way to match (docs/attribution.md says what each is worth). The producer notes which
fields an event carries as it will be sent (:func:`mask`: a small integer of bits, the
stream entry's ``k``; an opted-out copy has no ``obref``), so the worker knows the kinds at
delivery without reading any value or storing anything personal; an entry without ``k``
(a replayed dead letter, or one queued by an older capi) is judged from its JSON
(:func:`mask_of_json`).

Counts live in hourly Redis hashes (:meth:`capi.constants.RedisKeys.coverage`), written by
the deliver script atomically with the acknowledgement (:mod:`capi.queue`), field
``events`` plus one per kind, kept :data:`WINDOW_HOURS` + 1 hours; :func:`read` sums the
last :data:`WINDOW_HOURS` of them into shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from capi import schema
from capi.kinds import KINDS  # the one list of kind names (capi tail shows them too)

STRONG = ("email", "phone", "external_id", "oppref")
"""The kinds that identify a person or a click on their own; an event with none of them
rarely matches (``capi status`` warns when too many have none)."""

_STRONG = frozenset(STRONG)
WINDOW_HOURS = 24
HOUR_MS = 3_600_000
TTL_S = (WINDOW_HOURS + 1) * 3600
"""How long an hour's counts are kept."""
WEAK_SHARE_WARNING = 0.5
"""``capi status`` warns when more than this share of recent deliveries has no strong kind."""

# Each signal an event can carry, as a bit: a user field, or the event's oppref. A kind is
# present when any of its signals is ("ip_user_agent" needs both of its own).
_SIGNALS = (
    ("emails_sha256", "email"),
    ("phone_numbers_sha256", "phone"),
    ("external_ids_sha256", "external_id"),
    ("first_names_sha256", "name"),
    ("last_names_sha256", "name"),
    ("oppref", "oppref"),
    ("obref", "obref"),
    ("android_advertising_id", "aaid"),
    ("regions", "geo"),
    ("postal_codes", "geo"),
    ("cities", "geo"),
    ("countries", "geo"),
    ("ip_address", "ip"),
    ("user_agent", "ua"),
)
_BIT = {field: 1 << i for i, (field, _) in enumerate(_SIGNALS)}
_JSON_KEYS = tuple((f'"{field}":'.encode(), bit) for field, bit in _BIT.items())
_DATA = b',"data":{'


def mask(event: schema.Event) -> int:
    """The signals an event carries, as bits (what the stream entry keeps as ``k``)."""
    bits = _BIT["oppref"] if event.oppref is not None else 0
    user = event.user
    if user is not None:
        for name in user.model_fields_set:
            if getattr(user, name) is not None:
                bits |= _BIT.get(name, 0)
    return bits


def mask_of_sent(event: Mapping[str, Any]) -> int:
    """:func:`mask` of an event as sent, as plain data (without nulls, as its JSON)."""
    bits = _BIT["oppref"] if "oppref" in event else 0
    for name in event.get("user") or ():
        bits |= _BIT.get(name, 0)
    return bits


def mask_of_json(event_json: bytes) -> int:
    """:func:`mask`, told from an event's JSON as capi sends it (for entries queued
    without ``k``: replayed dead letters, or queued by an older capi).

    capi serializes ``data`` last, and every field before it is flat (``user`` holds only
    strings and lists of strings), so a key found before ``"data"`` is a real field: inside
    a JSON string a quote is escaped and cannot form ``"name":``.
    """
    end = event_json.find(_DATA)
    head = event_json if end < 0 else event_json[:end]
    return sum(bit for key, bit in _JSON_KEYS if key in head)


@lru_cache(maxsize=1024)
def kinds(bits: int) -> tuple[str, ...]:
    """The kinds (:data:`KINDS`) that a signal mask shows."""
    found = {kind for field, kind in _SIGNALS if bits & _BIT[field]}
    if {"ip", "ua"} <= found:
        found.add("ip_user_agent")
    return tuple(k for k in KINDS if k in found)


def count(masks: Iterable[int]) -> dict[str, int]:
    """``events`` (the number of masks), per kind how many events carry it, and
    ``any_strong``: how many carry at least one of :data:`STRONG`."""
    by_mask = Counter(masks)
    counts: Counter[str] = Counter()
    for bits, n in by_mask.items():
        shown = kinds(bits)
        for k in shown:
            counts[k] += n
        if not _STRONG.isdisjoint(shown):
            counts["any_strong"] += n
    return {"events": sum(by_mask.values()), **counts}


def bucket(now_ms: int) -> int:
    """The hour (since the epoch) that ``now_ms`` falls in."""
    return now_ms // HOUR_MS


def shares(totals: dict[str, int]) -> dict[str, float]:
    """Each kind's share of the events counted (0 to 1; all 0 when none were)."""
    n = totals.get("events", 0)
    return {k: round(totals.get(k, 0) / n, 4) if n else 0.0 for k in KINDS}


async def read(client: Any, keys: Any, now_ms: int) -> dict[str, Any]:
    """Deliveries of the last :data:`WINDOW_HOURS` hours: ``events``, ``shares`` per kind and
    ``none_strong`` (the share with none of :data:`STRONG`), read from Redis."""
    hour = bucket(now_ms)
    pipe = client.pipeline(transaction=False)
    for h in range(hour - WINDOW_HOURS + 1, hour + 1):
        pipe.hgetall(keys.coverage(h))
    totals: Counter[str] = Counter()
    for row in await pipe.execute():
        for k, v in row.items():
            totals[k.decode() if isinstance(k, bytes) else k] += int(v)
    n = totals.get("events", 0)
    strong = totals.get("any_strong", 0)
    return {
        "events": n,
        "shares": shares(totals),
        "none_strong": round((n - strong) / n, 4) if n else 0.0,
    }


MIN_EVENTS_TO_WARN = 20
"""Fewer recent deliveries than this say too little to warn about."""


def weak_warning(matching: dict[str, Any]) -> str | None:
    """One line for ``capi status`` when too many recent deliveries carry no strong kind
    (:data:`STRONG`); None otherwise."""
    n, weak = matching["events"], matching["none_strong"]
    if n < MIN_EVENTS_TO_WARN or weak <= WEAK_SHARE_WARNING:
        return None
    return (
        f"match coverage: {weak:.0%} of the {n} events delivered in the last "
        f"{WINDOW_HOURS} h carried no email, phone, external id or oppref, so they will "
        "rarely be attributed to an ad (see docs/attribution.md)"
    )
