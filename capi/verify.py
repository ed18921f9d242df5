"""Read-back: does the API show the events capi delivered?

``capi verify`` reads the Advertiser API's event monitoring (``GET {ads_api_base_url}/v1/
conversions/events?pid=...&limit=50``, with an *Advertiser* API key, never the Conversion
Key): a sample of the pixel's events from roughly the last 15 minutes, each with its channel,
``server_to_server`` (the Conversions API) or ``pixel_sdk`` (the browser Pixel). It compares
the sample with what capi delivered in the same window (the live-outcomes ring,
:mod:`capi.tail`): how many of capi's deliveries the API shows, which it does not show yet,
and which ids came from both the Pixel and capi (browser/server de-duplication at work).

The sample holds at most 50 events. When it is full, only capi's deliveries written after
the oldest of its own that the sample shows are expected there; older ones may simply be
left out of the sample. Deliveries younger than ``grace_s`` are reported as pending, not missing:
the stream can take a little while to show an event.

:func:`read_back` raises :class:`ReadBackError` with a one-line answer for every failure
(no key, a key without access, no stream for the account, an unreadable answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from capi.fingerprint import redact_bytes
from capi.tail import Line

PATH = "/v1/conversions/events"
LIMIT = 50
WINDOW_MS = 15 * 60 * 1000
SERVER = "server_to_server"
PIXEL = "pixel_sdk"


class ReadBackError(Exception):
    """Raised when the read-back cannot be made; ``kind`` names why (``key``, ``not_enabled``,
    ``unreachable``, ``unreadable``), the message says it in one line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Seen:
    """One event of the monitoring sample."""

    id: str
    channel: str
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """What the monitoring endpoint answered: its events, and whether it left some out."""

    events: list[Seen]
    full: bool


@dataclass
class Report:
    """The comparison of one destination's sample with capi's deliveries."""

    destination: str
    delivered: int = 0  # capi's deliveries in the window
    found: int = 0  # of them, shown by the API
    missing: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # delivered within the grace period
    both_channels: list[str] = field(default_factory=list)
    shown: int = 0  # events in the sample
    sample_full: bool = False

    @property
    def consistent(self) -> bool:
        """What the API shows agrees with what capi sent (and there was something to see)."""
        return not self.missing and (self.found > 0 or bool(self.pending))

    def message(self) -> str:
        """The one-line answer."""
        d = self.destination
        if not self.delivered and not self.shown:
            return (
                f"{d}: nothing to compare: capi delivered no event in the last 15 minutes and "
                "the API shows none (send some events first)"
            )
        if not self.delivered:
            return (
                f"{d}: capi delivered no event in the last 15 minutes; the API shows "
                f"{self.shown} from other senders (send some events through capi first)"
            )
        expected = self.found + len(self.missing)
        head = f"{d}: the API shows {self.found} of {expected} events capi delivered recently"
        if self.sample_full:
            head += f" (a full sample of {LIMIT}: older deliveries are not expected in it)"
        parts = [head]
        if self.missing:
            shown = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
            parts.append(f"not shown yet: {shown}")
        if self.pending:
            parts.append(f"{len(self.pending)} delivered too recently to expect")
        if self.both_channels:
            parts.append(f"{len(self.both_channels)} seen from both the Pixel and capi")
        return "; ".join(parts)

    def json(self) -> dict[str, Any]:
        """The object ``capi verify --json`` prints."""
        return {
            "destination": self.destination,
            "consistent": self.consistent,
            "delivered": self.delivered,
            "found": self.found,
            "missing": self.missing,
            "pending": self.pending,
            "both_channels": self.both_channels,
            "shown": self.shown,
            "sample_full": self.sample_full,
            "message": self.message(),
        }


async def read_back(
    http: httpx.AsyncClient, base_url: str, pixel_id: str, api_key: str, key_source: str
) -> Sample:
    """The monitoring sample of ``pixel_id``; ReadBackError with the answer otherwise."""
    try:
        answer = await http.get(
            base_url.rstrip("/") + PATH,
            params={"pid": pixel_id, "limit": LIMIT},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    except httpx.HTTPError as exc:
        raise ReadBackError(
            "unreachable", f"could not reach {base_url} ({type(exc).__name__})"
        ) from None
    # An endpoint or proxy may echo the Authorization header: what is shown of the answer
    # has the key replaced by its fingerprint.
    content = redact_bytes(answer.content, api_key)
    if answer.status_code in (401, 403):
        raise ReadBackError(
            "key",
            f"the key in {key_source} was refused (HTTP {answer.status_code}: "
            f"{_message(content)}); read-back needs an Advertiser API key with access "
            "to this ad account (Ads Manager -> Settings -> API keys), never the Conversion Key",
        )
    if answer.status_code == 404:
        raise ReadBackError(
            "not_enabled",
            "event monitoring is not enabled for this ad account (HTTP 404): the API has no "
            "event stream to read back; ask OpenAI support to enable it",
        )
    if answer.status_code != 200:
        raise ReadBackError(
            "unreachable",
            f"the monitoring endpoint answered HTTP {answer.status_code}: {_message(content)}",
        )
    return parse(answer.content)


def parse(body: bytes) -> Sample:
    """Read a monitoring answer: OpenAI's list envelope ``{"data": [...], "has_more"}``
    (``events`` is taken for ``data``), each event with an id and a channel (``event_id``
    and ``source`` are taken too). ReadBackError ``unreadable`` for any other shape."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ReadBackError("unreadable", "the monitoring answer is not JSON") from None
    rows = payload.get("data", payload.get("events")) if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ReadBackError(
            "unreadable", "the monitoring answer has no list of events (expected data: [...])"
        )
    events = []
    for row in rows:
        event_id = _first(row, ("id", "event_id"))
        channel = _first(row, ("channel", "source"))
        if event_id is None or channel is None:
            raise ReadBackError(
                "unreadable", "a monitored event has no id or channel (expected id, channel)"
            )
        stamp = row.get("timestamp_ms") if isinstance(row, Mapping) else None
        events.append(Seen(event_id, channel, stamp if type(stamp) is int else None))
    full = bool(payload.get("has_more")) or len(events) >= LIMIT
    return Sample(events, full)


def compare(
    destination: str,
    delivered: Sequence[Line],
    sample: Sample,
    *,
    now_ms: int,
    grace_s: float,
) -> Report:
    """Compare capi's deliveries (ring lines, any order) with the monitoring sample."""
    recent = {
        line.id: line
        for line in delivered
        if line.status == "delivered" and line.time_ms >= now_ms - WINDOW_MS
    }
    server = {s.id for s in sample.events if s.channel == SERVER}
    pixel = {s.id for s in sample.events if s.channel == PIXEL}
    # A full sample shows only the newest events the API received: capi's deliveries in a
    # batch written after the oldest one it shows must all be there; older ones may simply
    # have been left out. (Batches, not event timestamps: those need not follow the order
    # of sending.)
    shown_at = [line.time_ms for event_id, line in recent.items() if event_id in server]
    cutoff = min(shown_at, default=None) if sample.full else None
    report = Report(destination, delivered=len(recent), shown=len(sample.events))
    report.sample_full = sample.full
    for event_id, line in sorted(recent.items(), key=lambda kv: kv[1].time_ms):
        if event_id in server:
            report.found += 1
        elif line.time_ms > now_ms - grace_s * 1000:
            report.pending.append(event_id)
        elif sample.full and (cutoff is None or line.time_ms <= cutoff):
            continue  # not newer than what a full sample shows: not expected in it
        else:
            report.missing.append(event_id)
    report.both_channels = sorted(pixel & (server | set(recent)))
    return report


def _first(row: Any, names: tuple[str, ...]) -> str | None:
    if not isinstance(row, Mapping):
        return None
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _message(body: bytes) -> str:
    """The API's error message (or the start of a plain-text body), cut to one short line."""
    try:
        payload = orjson.loads(body)
        text = str(payload["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode(errors="replace")
    return " ".join(text.split())[:160] or "no message"
