"""capi's exceptions: one root, a few categories, a leaf per failure class.

::

    CapiError
    ├── ConfigError              settings missing or invalid
    ├── EventRejected            an event breaks a contract rule (also a ValueError)
    ├── KeyCheckFailed           the startup key check says the key cannot write events
    ├── QueueUnavailable         Redis could not be reached or did not answer in time
    │   └── QueueFull                Redis is full (maxmemory, noeviction): not queued
    └── SendError                a send to the events endpoint failed
        ├── MissingScopeError        401, Missing scopes: ads.third_party_events.write
        ├── UnauthorizedError        401, Unauthorized
        ├── UnknownPixelError        403, unknown pid
        ├── AccessDeniedError        401/403, RBAC: access denied
        ├── InvalidEventError        400/422 of any code, at events[i] or (bisect) none
        │   ├── OutsideTimeWindowError   event_timestamp_too_old, or 422 at ...timestamp_ms
        │   └── TooLargeError            413: the request is too large (split the batch)
        ├── RequestInvalidError      400/422 naming a request-level field (pid, ...)
        ├── NotFoundError            404: nothing at the base URL + /v1/events
        ├── RateLimitedError         429                               retryable
        ├── ServerError              5xx                               retryable
        ├── NetworkError             timeout, reset, dropped response  retryable
        └── UnexpectedResponseError  anything else

Every message carries the HTTP status, the request id and the API's own message when there
is one, and never the key: a key appears only as its fingerprint.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

from capi.failures import Reason, too_old

QUOTE_LIMIT = 40


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """A value fit for an error message: its repr, cut to ``limit`` characters (marked ``…``)
    so that a huge input never makes a huge message."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"… ({len(value):,} characters)"


class CapiError(Exception):
    """Raised for every error that capi itself raises."""


class ConfigError(CapiError):
    """Raised when a setting is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: where in the event, and what the rule says."""

    path: str
    rule: str
    # For a key the event has that is no field: the path above it. The key's own name is
    # the client's, and may be anything (an email address used as a key).
    parent: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}"

    def without_client_names(self, fields: Collection[str]) -> str:
        """The problem as text that names no key the client made up (for what is kept, such
        as the live view's ring in Redis): an unknown key is named by its place, and a path
        is cut before its first part that is not one of ``fields`` (or an index)."""
        if self.parent is not None:
            return f"{self.parent}: has a key that {self.rule}"
        kept = ""
        for part in _PARTS.findall(self.path):
            if not (part.startswith("[") or part.lstrip(".") in fields or part in _OWN_PLACES):
                return f"{kept or '(event)'}: under a key of the event's own, {self.rule}"
            kept += part
        return str(self)


_PARTS = re.compile(r"\[\d+\]|\.?[^.\[]+")
# capi's own names of a problem's place that are no field: the whole event, an input line.
_OWN_PLACES = ("(event)", "(line)")


class EventRejected(CapiError, ValueError):
    """Raised when an event breaks a rule of the contract; names each field and rule."""

    def __init__(self, problems: list[Problem], event_id: str | None = None) -> None:
        self.problems = problems
        self.event_id = event_id
        where = f"event {quote(event_id)}" if event_id else "event"
        lines = "; ".join(str(p) for p in problems)
        super().__init__(f"{where} refused: {lines}")


class KeyCheckFailed(CapiError):
    """Raised when the key check shows the Conversion Key cannot write events."""

    def __init__(self, diagnosis: str, error: SendError) -> None:
        self.diagnosis = diagnosis
        self.error = error
        super().__init__(diagnosis)


@dataclass(slots=True)
class Response:
    """What the API sent back for a failed send, as far as capi could read it."""

    status: int | None = None
    message: str = ""
    code: str | None = None
    param: str | None = None
    body: Any = None
    request_ids: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    event_index: int | None = None
    # Every events[i] the answer names (in param or errors[].param), first named first.
    event_indexes: list[int] = field(default_factory=list)
    request_field: str | None = None
    missing_scopes: list[str] = field(default_factory=list)
    # Whether the body was in OpenAI's error envelope ({"error": {...}}); a 401 or 403 that
    # is not (nor the platform's plain-text "RBAC: access denied") came from some other
    # server, which CAPI_BASE_URL may name by mistake.
    enveloped: bool = False


class QueueUnavailable(CapiError):
    """Raised when Redis cannot be reached or does not answer in time at enqueue (or for
    ``CAPI_REDIS_TIMEOUT_S`` while a burst worker drains).

    The message says whether the event may have been stored anyway (an answer lost after
    the call was sent, or a durability wait that did not confirm it), and so does
    ``maybe_stored``: False only when Redis refused the write or the credentials (full,
    read-only, denied, a key of another type), to one destination. Enqueueing it again is
    always safe: the event id dedups.
    """

    retryable = True

    def __init__(self, message: str = "", *, maybe_stored: bool = True) -> None:
        super().__init__(message)
        self.maybe_stored = maybe_stored


class QueueFull(QueueUnavailable):
    """Raised when Redis refuses the event for want of memory (maxmemory under noeviction):
    the event was not queued. Workers drain the queue and free memory; retry later."""

    def __init__(self, message: str = "", *, maybe_stored: bool = False) -> None:
        super().__init__(message, maybe_stored=maybe_stored)


class SendError(CapiError):
    """Raised when a send to the events endpoint fails; ``reason`` names the class."""

    reason: ClassVar[Reason] = Reason.UNEXPECTED

    def __init__(self, response: Response, key_fingerprint: str = "") -> None:
        self.response = response
        self.key_fingerprint = key_fingerprint
        super().__init__(self._describe())

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again unchanged."""
        return self.reason.retryable

    @property
    def status(self) -> int | None:
        """The HTTP status, or None when no response arrived."""
        return self.response.status

    @property
    def request_id(self) -> str | None:
        """The first request/trace id the response carried, if any."""
        return next(iter(self.response.request_ids.values()), None)

    def _describe(self) -> str:
        r = self.response
        parts = [self.reason.value]
        if r.status is not None:
            parts.append(f"HTTP {r.status}")
        if r.message:
            parts.append(r.message)
        if r.param:
            parts.append(f"param={r.param}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        if self.key_fingerprint:
            parts.append(f"key {self.key_fingerprint}")
        return ": ".join(parts[:2]) + (" (" + "; ".join(parts[2:]) + ")" if parts[2:] else "")


class MissingScopeError(SendError):
    """Raised on 401 Missing scopes: the key lacks ads.third_party_events.write."""

    reason = Reason.MISSING_SCOPE


class UnauthorizedError(SendError):
    """Raised on 401 Unauthorized: the key is unknown, revoked or mistyped."""

    reason = Reason.UNAUTHORIZED


class UnknownPixelError(SendError):
    """Raised on 403 unknown pid: the pixel id is wrong for this key."""

    reason = Reason.UNKNOWN_PIXEL


class AccessDeniedError(SendError):
    """Raised on an RBAC access denial, which is often transient on the platform side."""

    reason = Reason.ACCESS_DENIED


class InvalidEventError(SendError):
    """Raised on a 400 or 422 (any code) rejecting an event; ``event_index`` says which, if
    the answer names ``events[i]`` in its ``param`` or an ``errors[].param``."""

    reason = Reason.INVALID_EVENT

    @property
    def event_index(self) -> int | None:
        """The index of the rejected event within the batch, from ``param: events[i]``."""
        return self.response.event_index

    def for_event(self, index: int) -> InvalidEventError:
        """This rejection as it concerns ``events[index]`` alone: its param, only the
        ``errors[]`` entries that name it (for that event's dead letter), and the class they
        say: outside the time window only when they, or the answer's own code where its param
        names this event, say "too old". An event with no entry of its own goes by what names
        no event (an entry without a param, the answer's own code without one), as the
        answer as a whole does."""
        r = self.response
        mine = f"events[{index}]"
        body = r.body
        error = body.get("error") if isinstance(body, dict) else None
        entries: list[dict[str, Any]] = []
        own: list[dict[str, Any]] = []
        if isinstance(error, dict) and isinstance(error.get("errors"), list):
            entries = [e for e in error["errors"] if isinstance(e, dict)]
            own = [e for e in entries if _names(e.get("param"), mine)]
            body = {**body, "error": {**error, "errors": own or error["errors"]}}
        param_is_mine = _names(r.param, mine)
        narrowed = dataclasses.replace(
            r,
            param=r.param if param_is_mine else mine,
            body=body,
            event_index=index,
            event_indexes=[index],
        )
        cls: type[InvalidEventError] = type(self)
        if cls in (InvalidEventError, OutsideTimeWindowError):
            said = [(e.get("code"), e.get("param")) for e in own]
            if param_is_mine:
                said.append((r.code, r.param))
            if not own:  # no errors[] entry of its own: what names no event speaks for it
                general = [(e.get("code"), e.get("param")) for e in entries]
                said += [(c, p) for c, p in [*general, (r.code, r.param)] if not _names_any(p)]
            codes = [c if isinstance(c, str) else None for c, _ in said]
            params = [p if isinstance(p, str) else None for _, p in said]
            old = too_old(r.status or 0, codes, params)
            cls = OutsideTimeWindowError if old else InvalidEventError
        return cls(narrowed, self.key_fingerprint)


def _names(param: Any, event: str) -> bool:
    """Whether an answer's ``param`` names ``event`` (``events[1]``, or a field under it)."""
    return isinstance(param, str) and (
        param == event or param.startswith(event + ".") or param.startswith(event + "[")
    )


def _names_any(param: Any) -> bool:
    """Whether an answer's ``param`` names an event (``events[i]``, or a field under it)."""
    return isinstance(param, str) and param.startswith("events[")


class TooLargeError(InvalidEventError):
    """Raised on 413: the request is too large; the batch is split (no event is named)."""

    reason = Reason.TOO_LARGE

    @property
    def event_index(self) -> int | None:
        """No event is named: a 413 is about the whole request."""
        return None


class RequestInvalidError(SendError):
    """Raised on a 400 or 422 that names a request-level field (``response.request_field``:
    pid, validate_only, ...), not an event: a configuration problem."""

    reason = Reason.REQUEST_INVALID


class NotFoundError(SendError):
    """Raised on 404: nothing answers at the configured base URL + /v1/events."""

    reason = Reason.NOT_FOUND


class OutsideTimeWindowError(InvalidEventError):
    """Raised when the code is event_timestamp_too_old, or a 422 names ``...timestamp_ms``:
    the event can never be accepted."""

    reason = Reason.OUTSIDE_TIME_WINDOW


class RateLimitedError(SendError):
    """Raised on 429; ``response.retry_after_s`` carries the server's wish."""

    reason = Reason.RATE_LIMITED


class ServerError(SendError):
    """Raised on a 5xx answer."""

    reason = Reason.SERVER_ERROR


class NetworkError(SendError):
    """Raised when no usable response arrived: timeout, refused, reset, dropped."""

    reason = Reason.NETWORK


class UnexpectedResponseError(SendError):
    """Raised on any answer capi does not recognise; the raw body is kept."""

    reason = Reason.UNEXPECTED


ERROR_BY_REASON: dict[Reason, type[SendError]] = {
    cls.reason: cls
    for cls in (
        MissingScopeError,
        UnauthorizedError,
        UnknownPixelError,
        AccessDeniedError,
        InvalidEventError,
        TooLargeError,
        RequestInvalidError,
        NotFoundError,
        OutsideTimeWindowError,
        RateLimitedError,
        ServerError,
        NetworkError,
        UnexpectedResponseError,
    )
}
