"""Match coverage: which identifier kinds the delivered events carried, and how often.

The API attributes a conversion to an ad by matching it to a person; each identifier kind
is one way to match (docs/attribution.md says what each is worth). The kinds are told from
the event's JSON as it is sent, at delivery (:func:`kinds_of`), so nothing new is stored
for them and an event replayed or retried is judged as it finally went out (an opted-out
event has no ``obref``). No value is read: only which fields are present.

Counts live in hourly Redis hashes (:meth:`capi.constants.RedisKeys.coverage`), written by
the deliver script atomically with the acknowledgement (:mod:`capi.queue`), field
``events`` plus one per kind, kept :data:`WINDOW_HOURS` + 1 hours; :func:`read` sums the
last :data:`WINDOW_HOURS` of them into shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

KINDS = (
    "email",
    "phone",
    "external_id",
    "name",
    "oppref",
    "obref",
    "ip_user_agent",
    "aaid",
    "geo",
)
"""The identifier kinds counted, as named in ``capi destinations --json``'s match_coverage."""

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

# JSON keys whose presence shows a kind (all of them: any; "ip_user_agent" needs both).
_ANY: dict[str, tuple[bytes, ...]] = {
    "email": (b'"emails_sha256":',),
    "phone": (b'"phone_numbers_sha256":',),
    "external_id": (b'"external_ids_sha256":',),
    "name": (b'"first_names_sha256":', b'"last_names_sha256":'),
    "oppref": (b'"oppref":',),
    "obref": (b'"obref":',),
    "aaid": (b'"android_advertising_id":',),
    "geo": (b'"regions":', b'"postal_codes":', b'"cities":', b'"countries":'),
}
_IP_UA = (b'"ip_address":', b'"user_agent":')
_DATA = b',"data":{'


def kinds_of(event_json: bytes) -> list[str]:
    """The identifier kinds an event carries, from its JSON as capi sends it.

    capi serializes ``data`` last, and every field before it is flat (``user`` holds only
    strings and lists of strings), so a key found before ``"data"`` is a real field: inside
    a JSON string a quote is escaped and cannot form ``"name":``.
    """
    end = event_json.find(_DATA)
    head = event_json if end < 0 else event_json[:end]
    found = [kind for kind, keys in _ANY.items() if any(k in head for k in keys)]
    if _IP_UA[0] in head and _IP_UA[1] in head:
        found.append("ip_user_agent")
    return found


def count(events: Iterable[bytes]) -> dict[str, int]:
    """``events`` (the number of events), per kind how many carry it, and ``any_strong``:
    how many carry at least one of :data:`STRONG`."""
    counts: Counter[str] = Counter()
    n = 0
    for e in events:
        n += 1
        kinds = kinds_of(e)
        counts.update(kinds)
        if any(k in _STRONG for k in kinds):
            counts["any_strong"] += 1
    return {"events": n, **counts}


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
