"""The failure classes: every way a send can fail, and what it means.

What the worker then does with the batch (the fate) is decided in one table,
:data:`capi.worker.decisions.FATES`, which has a row for every reason.

=====================  ===================================================================
reason                 meaning
=====================  ===================================================================
missing_scope          401: the key lacks ads.third_party_events.write
unauthorized           401: the API does not know the key
unknown_pixel          403: the API does not know the pixel id
access_denied          401/403 such as plain-text "RBAC: access denied"
invalid_event          400/422 of any code naming events[i] (whatever its message), or
                       naming no field: an event breaks a rule (no index: bisect)
request_invalid        400/422 naming a request-level field (pid, validate_only, events,
                       ...): a configuration problem, not an event's
too_large              413: the request is too large
not_found              404: nothing at CAPI_BASE_URL + /v1/events
outside_time_window    event_timestamp_too_old, 422 at ..timestamp_ms, or caught locally:
                       older than 7 days (never replayable)
rate_limited           429
server_error           5xx
network                timeout, reset, refused, dropped response
retries_exhausted      a retryable failure whose next attempt would fall past the event's
                       7-day window, or past CAPI_MAX_ATTEMPTS when set
unexpected             anything else (the raw body is kept)
=====================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Reason(StrEnum):
    """Why a send failed; the value is the reason code shown to operators."""

    MISSING_SCOPE = "missing_scope"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_PIXEL = "unknown_pixel"
    ACCESS_DENIED = "access_denied"
    INVALID_EVENT = "invalid_event"
    REQUEST_INVALID = "request_invalid"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    OUTSIDE_TIME_WINDOW = "outside_time_window"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    NETWORK = "network"
    RETRIES_EXHAUSTED = "retries_exhausted"
    UNEXPECTED = "unexpected"

    @property
    def meaning(self) -> str:
        """One line saying what the failure means."""
        return _MEANINGS[self]

    @property
    def retryable(self) -> bool:
        """Whether sending the same events again may succeed without any change."""
        return self in _RETRYABLE

    @property
    def key_problem(self) -> bool:
        """Whether the failure is about the key or pixel, so the worker re-probes or holds."""
        return self in _KEY_PROBLEMS

    @property
    def config_problem(self) -> bool:
        """Whether the failure is about the destination's settings (pixel id, base URL, a
        request-level field), not its events: the worker holds it and keeps the events."""
        return self in _CONFIG_PROBLEMS

    @property
    def holds(self) -> bool:
        """Whether a confirmed failure of this kind holds the destination (key or config)."""
        return self in _KEY_PROBLEMS or self in _CONFIG_PROBLEMS

    @property
    def maybe_transient(self) -> bool:
        """Whether a key failure is known to happen spuriously and needs a re-probe to confirm."""
        return self in (Reason.MISSING_SCOPE, Reason.ACCESS_DENIED, Reason.UNAUTHORIZED)

    @property
    def replayable(self) -> bool:
        """Whether replaying a dead letter of this reason can succeed once its cause is fixed."""
        return self is not Reason.OUTSIDE_TIME_WINDOW


_MEANINGS = {
    Reason.MISSING_SCOPE: "the key lacks the ads.third_party_events.write scope",
    Reason.UNAUTHORIZED: "the API does not recognise the key (revoked, mistyped or truncated)",
    Reason.UNKNOWN_PIXEL: "the API does not recognise the pixel id for this key",
    Reason.ACCESS_DENIED: "the platform denied access (RBAC), often transiently",
    Reason.INVALID_EVENT: "the API rejected the event as invalid",
    Reason.REQUEST_INVALID: "the API rejected a request-level field (not an event)",
    Reason.TOO_LARGE: "the API refused the request as too large (413)",
    Reason.NOT_FOUND: "nothing answers at the events endpoint's URL (404)",
    Reason.OUTSIDE_TIME_WINDOW: "the event is older than 7 days (or too far ahead)",
    Reason.RATE_LIMITED: "the API asked us to slow down (429)",
    Reason.SERVER_ERROR: "the API failed on its side (5xx)",
    Reason.NETWORK: "the endpoint could not be reached or the response was lost",
    Reason.RETRIES_EXHAUSTED: "a retryable failure persisted past the attempt budget",
    Reason.UNEXPECTED: "the API answered in a way capi does not recognise",
}
TOO_OLD_CODE = "event_timestamp_too_old"


def too_old(status: int, codes: Iterable[str | None], params: Iterable[str | None]) -> bool:
    """Whether a rejection says the event is too old: its code says so, or it is a 422 whose
    param names ``...timestamp_ms``; any other 400/422 is an ordinary rejection."""
    return TOO_OLD_CODE in codes or (
        status == 422 and any(p and p.endswith(".timestamp_ms") for p in params)
    )


_RETRYABLE = frozenset({Reason.RATE_LIMITED, Reason.SERVER_ERROR, Reason.NETWORK})
_KEY_PROBLEMS = frozenset(
    {Reason.MISSING_SCOPE, Reason.UNAUTHORIZED, Reason.UNKNOWN_PIXEL, Reason.ACCESS_DENIED}
)
_CONFIG_PROBLEMS = frozenset({Reason.UNKNOWN_PIXEL, Reason.NOT_FOUND, Reason.REQUEST_INVALID})
