"""The sandbox's imitation of event monitoring (read-back) on the Advertiser API.

``GET /v1/conversions/events?pid=...&limit=50`` with an *Advertiser* API key answers a
sample of the pixel's events from roughly the last 15 minutes, newest first, each with its
channel: ``server_to_server`` for events the sandbox accepted on ``POST /v1/events`` (never
validate-only ones), ``pixel_sdk`` for events a test says the browser Pixel sent
(``POST /_sandbox/pixel``). As the contract says of the real endpoint: a Conversion Key is
refused (it is for the events endpoint only), an account without the stream gets 404.

Tests play the API's gaps with ``enabled`` (False: 404) and ``hidden`` (event ids the
stream leaves out, as if not processed yet).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

WINDOW_MS = 15 * 60 * 1000
MAX_LIMIT = 50
KEPT = 20_000  # events remembered for read-back (the oldest are forgotten)
DEFAULT_ADVERTISER_KEY = "sk-ads-sandbox-advertiser-read-key-0003"
READ_SCOPE = "api.ads.read"


@dataclass(frozen=True, slots=True)
class Seen:
    """One event as the monitoring stream shows it."""

    pixel_id: str
    event_id: str
    type: str
    timestamp_ms: int
    received_ms: int
    channel: str


class Monitoring:
    """What the sandbox received, as the Advertiser API's event monitoring shows it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.advertiser_keys = {DEFAULT_ADVERTISER_KEY}
        self.enabled = True
        self.hidden: set[str] = set()
        self._seen: deque[Seen] = deque(maxlen=KEPT)
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every event seen."""
        with self._lock:
            self._seen.clear()
            self.hidden = set()

    def record(self, pixel_id: str, events: list[tuple[str, str, int]], channel: str) -> None:
        """Remember accepted events: (type, id, timestamp_ms) each, from ``channel``."""
        now = int(self.clock() * 1000)
        with self._lock:
            self._seen.extend(Seen(pixel_id, i, t, ts, now, channel) for t, i, ts in events)

    def answer(
        self, query: dict[str, str], key: str, conversion_keys: set[str]
    ) -> tuple[int, bytes]:
        """Status and JSON body of ``GET /v1/conversions/events``."""
        if key in conversion_keys:
            return 401, _error(
                "You have insufficient permissions for this operation. Missing scopes: "
                f"{READ_SCOPE}. A Conversion Key writes events only; read them with an "
                "Advertiser API key.",
                code="missing_scope",
            )
        if key not in self.advertiser_keys:
            return 401, _error("Unauthorized")
        pid = query.get("pid", "")
        if not pid:
            return 400, _error("Missing required query parameter: pid", param="pid")
        if not self.enabled:
            return 404, _error("Not found")
        try:
            limit = min(MAX_LIMIT, max(1, int(query.get("limit", MAX_LIMIT))))
        except ValueError:
            return 400, _error("limit must be an integer", param="limit")
        since = int(self.clock() * 1000) - WINDOW_MS
        with self._lock:
            recent = [
                s
                for s in reversed(self._seen)
                if s.pixel_id == pid and s.received_ms >= since and s.event_id not in self.hidden
            ]
        data = [
            {
                "object": "conversion_event",
                "id": s.event_id,
                "type": s.type,
                "timestamp_ms": s.timestamp_ms,
                "channel": s.channel,
            }
            for s in recent[:limit]
        ]
        body = {"object": "list", "data": data, "has_more": len(recent) > limit}
        return 200, orjson.dumps(body)

    def configure(self, config: dict[str, Any]) -> None:
        """Apply ``monitoring`` settings from ``POST /_sandbox/config``."""
        if "enabled" in config:
            self.enabled = bool(config["enabled"])
        if "hidden" in config:
            self.hidden = {str(i) for i in config["hidden"]}
        if "advertiser_keys" in config:
            self.advertiser_keys = {str(k) for k in config["advertiser_keys"]}


def _error(message: str, **extra: Any) -> bytes:
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error"}
    error.update({"param": None, "code": None, **extra})
    return orjson.dumps({"error": error})
