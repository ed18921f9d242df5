"""The sandbox's state and its answer to each events request.

Events are judged by :mod:`capi.sandbox.contract`, the sandbox's own reading of the
contract (never capi's validation, which the sandbox exists to test).

Keys: a *conversion* key can write events; a *scopeless* key (an Advertiser or platform
key) gets ``401 Missing scopes``; any other key gets ``401 Unauthorized``. Pixels not in
``pixels`` get ``403 unknown pid``. Accepted events are deduplicated by pixel, event name and
id (first one wins) and counted, duplicates too, so tests can prove exactly-once delivery.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

from capi.constants import API_MAX_EVENTS_PER_REQUEST, CONVERSIONS_SCOPE
from capi.sandbox.contract import Issue, check_event, is_too_old
from capi.sandbox.monitoring import Monitoring

Clock = Callable[[], float]

FaultKind = Literal[
    "missing_scope", "rbac", "unauthorized", "rate_limit", "server_error", "drop", "latency"
]
SCOPE_MESSAGE = (
    "You have insufficient permissions for this operation. Missing scopes: "
    f"{CONVERSIONS_SCOPE}. Check that you have the correct role in your organization, and if "
    "you're using a restricted API key, that it has the necessary scopes."
)
DEFAULT_KEY = "sk-svcacct-sandbox-conversion-key-0001"
DEFAULT_SCOPELESS_KEY = "sk-proj-sandbox-advertiser-key-0002"
DEFAULT_PIXEL = "sandbox-pixel-00000001"
RECENT_EVENTS = 1000


@dataclass
class Fault:
    """A fault injected into events requests: on every Nth request, or at random."""

    kind: FaultKind
    rate: float = 0.0
    every: int = 0
    remaining: int | None = None
    retry_after_s: float | None = 1.0
    latency_ms: int = 0
    status: int = 503

    def hits(self, request_no: int, rng: random.Random) -> bool:
        """Whether this fault applies to request number ``request_no`` (1-based)."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        hit = (self.every > 0 and request_no % self.every == 0) or (
            self.rate > 0 and rng.random() < self.rate
        )
        if hit and self.remaining is not None:
            self.remaining -= 1
        return hit


@dataclass
class Reply:
    """What the server writes back (or, with ``drop``, does not)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    delay_s: float = 0.0


def _error(status: int, message: str, **extra: Any) -> Reply:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    error.update(extra)
    return Reply(status, orjson.dumps({"error": error}))


class SandboxState:
    """Keys, pixels, faults and the record of what the sandbox received and accepted."""

    def __init__(
        self,
        *,
        conversion_keys: set[str] | None = None,
        scopeless_keys: set[str] | None = None,
        pixels: set[str] | None = None,
        seed: int = 0,
        clock: Clock = time.time,
    ) -> None:
        self.conversion_keys = set(conversion_keys or {DEFAULT_KEY})
        self.scopeless_keys = set(scopeless_keys or {DEFAULT_SCOPELESS_KEY})
        self.pixels = set(pixels or {DEFAULT_PIXEL})
        self.faults: list[Fault] = []
        # How event rejections look; tests change these to play an API that has changed.
        # A key may write only its own ad account's pixels, when listed here.
        self.key_pixels: dict[str, set[str]] = {}
        self.report_index = True  # False: rejections omit events[i] everywhere
        self.index_in_param = True  # False: only errors[].param names events[i]
        # errors[] lists every rejected event of a batch (param names the first); False:
        # only the first rejected event is named, one per answer.
        self.every_rejection = True
        self.rejection_status = 400
        self.rejection_code: str | None = "invalid_event"
        self.accepted_delta = 0  # added to accepted_events in a 200 (the docs say never)
        self.clock = clock
        self.monitoring = Monitoring(clock)  # the read-back endpoint's view of accepted events
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything received; keep keys, pixels and faults."""
        with self.lock:
            self.requests = 0
            self.received: Counter[tuple[str, str, str]] = Counter()
            # Events accepted, by (pixel, key, integration_source) of their request.
            self.senders: Counter[tuple[str, str, str | None]] = Counter()
            self.statuses: Counter[int] = Counter()
            self.batch_sizes: list[int] = []
            self.validate_only_requests = 0
            self.first_batch_at: float | None = None  # wall clock, for benchmarks
            self.last_batch_at: float | None = None
            # The last events accepted, as received, so tests can see what was sent.
            self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.monitoring.reset()

    # -- what tests read -------------------------------------------------------------
    def delivered_counts(self) -> Counter[tuple[str, str, str]]:
        """How often each (pixel, event name, event id) was accepted."""
        with self.lock:
            return Counter(self.received)

    def delivered_ids(self) -> Counter[str]:
        """Event id -> times a valid, non-validate-only request carried it."""
        with self.lock:
            out: Counter[str] = Counter()
            for (_, _, event_id), n in self.received.items():
                out[event_id] += n
            return out

    def recent_events(self) -> list[dict[str, Any]]:
        """The last :data:`RECENT_EVENTS` events accepted (not validate-only), oldest first."""
        with self.lock:
            return list(self.recent)

    def summary(self) -> dict[str, Any]:
        """Counts, as JSON-ready data."""
        with self.lock:
            unique = len(self.received)
            total = sum(self.received.values())
            return {
                "requests": self.requests,
                "validate_only_requests": self.validate_only_requests,
                "accepted_unique": unique,
                "accepted_total": total,
                "duplicates": total - unique,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "batches": len(self.batch_sizes),
                "max_batch": max(self.batch_sizes, default=0),
                "first_batch_at": self.first_batch_at,
                "last_batch_at": self.last_batch_at,
            }

    def configure(self, config: dict[str, Any]) -> None:
        """Apply a JSON config: keys, pixels, faults, seed (as sent to /_sandbox/config)."""
        with self.lock:
            for name in ("conversion_keys", "scopeless_keys", "pixels"):
                if name in config:
                    setattr(self, name, set(config[name]))
            if "faults" in config:
                self.faults = [Fault(**f) for f in config["faults"]]
            for name in ("report_index", "index_in_param", "every_rejection"):
                if name in config:
                    setattr(self, name, bool(config[name]))
            if "rejection_status" in config:
                self.rejection_status = int(config["rejection_status"])
            if "rejection_code" in config:
                self.rejection_code = config["rejection_code"]
            if "accepted_delta" in config:
                self.accepted_delta = int(config["accepted_delta"])
            if "seed" in config:
                self.rng = random.Random(config["seed"])
            if "monitoring" in config:
                self.monitoring.configure(config["monitoring"])

    def config(self) -> dict[str, Any]:
        """The current configuration, keys shown in full (the sandbox's keys are not secret)."""
        return {
            "conversion_keys": sorted(self.conversion_keys),
            "scopeless_keys": sorted(self.scopeless_keys),
            "pixels": sorted(self.pixels),
            "faults": [asdict(f) for f in self.faults],
        }

    # -- the endpoint ----------------------------------------------------------------
    def handle_events(self, query: dict[str, str], headers: dict[str, str], body: bytes) -> Reply:
        """Answer ``POST /v1/events`` as the contract says the API does."""
        with self.lock:
            self.requests += 1
            request_no = self.requests
            fault = next((f for f in self.faults if f.hits(request_no, self.rng)), None)
        reply = (
            self._fault_reply(fault) if fault and fault.kind not in ("drop", "latency") else None
        )
        if reply is None:
            reply = self._process(query, headers, body)
        if fault is not None and fault.kind == "drop":
            reply.drop = True
        if fault is not None and fault.kind == "latency":
            reply.delay_s = fault.latency_ms / 1000
        reply.headers.setdefault("x-request-id", f"req_sbx_{request_no:08x}")
        with self.lock:
            self.statuses[reply.status if not reply.drop else 0] += 1
        return reply

    def _fault_reply(self, fault: Fault) -> Reply:
        if fault.kind == "missing_scope":
            return _error(401, SCOPE_MESSAGE, code="missing_scope")
        if fault.kind == "rbac":
            return Reply(403, b"RBAC: access denied", content_type="text/plain")
        if fault.kind == "unauthorized":
            return _error(401, "Unauthorized")
        if fault.kind == "rate_limit":
            reply = _error(429, "Rate limit reached", type="rate_limit_error")
            if fault.retry_after_s is not None:
                reply.headers["retry-after"] = f"{fault.retry_after_s:g}"
            return reply
        return _error(
            fault.status, "The server had an error processing your request.", type="server_error"
        )

    def _process(self, query: dict[str, str], headers: dict[str, str], body: bytes) -> Reply:
        key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        pid = query.get("pid") or ""
        refused = self._authorize(key, pid)
        if refused is not None:
            return refused
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON body")
        if not isinstance(payload, dict) or "events" not in payload:
            return _error(400, "Missing required field: events")
        events = payload["events"]
        if not isinstance(events, list) or not events:
            return _error(400, "events must be a non-empty list", param="events")
        if len(events) > API_MAX_EVENTS_PER_REQUEST:
            return _error(
                400,
                f"At most {API_MAX_EVENTS_PER_REQUEST} events per request",
                param="events",
                code="invalid_event",
            )
        validate_only = payload.get("validate_only") is True
        checked, reply = self._validate(events)
        if reply is not None:
            return reply
        with self.lock:
            if validate_only:
                self.validate_only_requests += 1
            else:
                self.batch_sizes.append(len(checked))
                self.last_batch_at = time.time()
                self.first_batch_at = self.first_batch_at or self.last_batch_at
                for name, event_id in checked:
                    self.received[(pid, name, event_id)] += 1
                self.recent.extend(events)
                self.monitoring.record(
                    pid,
                    [(e["type"], e["id"], e["timestamp_ms"]) for e in events],
                    "server_to_server",
                )
                source = payload.get("integration_source")
                self.senders[(pid, key, source if isinstance(source, str) else None)] += len(
                    checked
                )
        return Reply(200, orjson.dumps({"accepted_events": len(checked) + self.accepted_delta}))

    def _authorize(self, key: str, pid: str) -> Reply | None:
        """The refusal of a key or pixel, or None when this key may write this pixel."""
        if key in self.scopeless_keys:
            return _error(401, SCOPE_MESSAGE, code="missing_scope")
        if key not in self.conversion_keys:
            return _error(401, "Unauthorized")
        if not pid:
            return _error(
                400, "[{'type': 'missing', 'loc': ('query', 'pid'), 'msg': 'Field required'}]"
            )
        if pid not in self.pixels:
            return _error(403, "403: unknown pid", type="server_error")
        owned = self.key_pixels.get(key)
        if owned is not None and pid not in owned:  # the pixel is another ad account's
            return _error(403, "403: unknown pid", type="server_error")
        return None

    def _validate(self, events: list[Any]) -> tuple[list[tuple[str, str]], Reply | None]:
        now = int(self.clock() * 1000)
        checked: list[tuple[str, str]] = []
        rejected: list[tuple[int, list[Issue]]] = []
        for i, raw in enumerate(events):
            if is_too_old(raw, now):
                if rejected:
                    break
                return checked, _error(
                    422,
                    f"Event at events[{i}] is older than 7 days.",
                    param=f"events[{i}].timestamp_ms",
                    code="event_timestamp_too_old",
                )
            issues = check_event(raw, now)
            if issues:
                rejected.append((i, issues))
                if not self.every_rejection:
                    break
                continue
            name = raw["custom_event_name"].lower() if raw["type"] == "custom" else raw["type"]
            checked.append((name, raw["id"]))
        if rejected:
            return checked, self._rejection(rejected)
        return checked, None

    def _rejection(self, rejected: list[tuple[int, list[Issue]]]) -> Reply:
        errors = [
            {
                "message": issue.message,
                "param": ".".join(
                    p for p in (f"events[{i}]" if self.report_index else "", issue.param) if p
                )
                or None,
                "code": issue.code,
            }
            for i, issues in rejected
            for issue in issues
        ]
        where = f"events[{rejected[0][0]}]" if self.report_index else ""
        at = f" at {where}" if where else ""
        return _error(
            self.rejection_status,
            f"Invalid event{at}. See errors for details.",
            param=where if self.report_index and self.index_in_param else None,
            code=self.rejection_code,
            errors=errors,
        )
