"""The events endpoint client: one attempt per call, every failure classified.

:class:`ConversionsClient` wraps one shared ``httpx.AsyncClient``. :meth:`~ConversionsClient.send`
posts already-serialized events (bytes, joined without re-encoding) and either returns
:class:`Accepted` or raises a :class:`~capi.errors.SendError` leaf chosen by
:func:`classify`. httpx's own exceptions are translated here and nowhere else. Everything
received (body, headers) has the key replaced by its fingerprint here, before anything is
built from it, so that no dead letter, retry record, key state or output can carry the key
even when an endpoint or proxy echoes the ``Authorization`` header.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from capi.constants import CONVERSIONS_SCOPE, EVENTS_PATH
from capi.destinations import Destination
from capi.errors import ERROR_BY_REASON, ConfigError, NetworkError, Response, SendError
from capi.failures import TOO_OLD_CODE, Reason, too_old
from capi.fingerprint import fingerprint, redact, redact_bytes, shape_problem
from capi.guidance import Labels
from capi.retry import parse_retry_after
from capi.settings import safe_url

_EVENT_INDEX = re.compile(r"^events\[(\d{1,9})\]")
_SCOPES = re.compile(r"Missing scopes?:\s*([A-Za-z0-9_.:\-, ]+?)(?:\.\s|\.$|$)")
log = logging.getLogger("capi.client")
USER_AGENT = "capi/0.1 (+https://github.com/capi)"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A successful send: how many events the API accepted, and the response's ids."""

    accepted_events: int | None
    status: int
    request_ids: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def build_body(
    events: Sequence[bytes], *, validate_only: bool = False, integration_source: str | None = None
) -> bytes:
    """The request body for already-serialized events, built by joining bytes."""
    if not events:
        raise ValueError("never send an empty batch: the API's behaviour is unknown")
    head = b'{"validate_only":' + (b"true" if validate_only else b"false")
    if integration_source:
        head += b',"integration_source":' + orjson.dumps(integration_source)
    return head + b',"events":[' + b",".join(events) + b"]}"


def request_ids(headers: Mapping[str, str]) -> dict[str, str]:
    """Every header support may ask for: names containing ``request-id`` or ``trace``."""
    return {
        k.lower(): v
        for k, v in headers.items()
        if "request-id" in k.lower() or "trace" in k.lower()
    }


def classify(
    status: int, headers: Mapping[str, str], body: bytes, key_fingerprint: str = ""
) -> SendError:
    """Turn a non-2xx response into the SendError leaf of its failure class."""
    parsed: Any = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    text = body.decode("utf-8", "replace")[:2000]
    message, code, param = "", None, None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = error.get("code") if isinstance(error.get("code"), str) else None
        param = error.get("param") if isinstance(error.get("param"), str) else None
    elif isinstance(error, str):
        message = error
    elif isinstance(parsed, dict) and isinstance(parsed.get("detail"), str | list):
        message = str(parsed["detail"])
    else:
        message = text.strip()
    response = Response(
        status=status,
        message=message,
        code=code,
        param=param,
        body=parsed if parsed is not None and _shallow(parsed) else text,
        request_ids=request_ids(headers),
        retry_after_s=parse_retry_after(headers.get("retry-after")),
        enveloped=isinstance(error, dict),
    )
    params, codes = [param, *_details(error, "param")], [code, *_details(error, "code")]
    response.event_indexes = _event_indexes(params)
    response.event_index = next(iter(response.event_indexes), None)
    if status in (400, 422) and response.event_index is None:
        response.request_field = _request_field(params, parsed, message)
    reason = _reason(status, message, codes, params, response)
    if reason is Reason.MISSING_SCOPE:
        response.missing_scopes = _missing_scopes(message) or [CONVERSIONS_SCOPE]
    return ERROR_BY_REASON[reason](response, key_fingerprint)


def _reason(
    status: int, message: str, codes: list[str | None], params: list[str | None], r: Response
) -> Reason:
    code = codes[0]
    lowered = message.lower()
    if status in (400, 422) and r.event_index is not None:
        # An answer that names events[i] is that event's rejection, whatever its message.
        return (
            Reason.OUTSIDE_TIME_WINDOW if too_old(status, codes, params) else Reason.INVALID_EVENT
        )
    if "missing scope" in lowered or code == "missing_scope":
        return Reason.MISSING_SCOPE
    if "rbac" in lowered or "access denied" in lowered:
        return Reason.ACCESS_DENIED
    if status == 401:
        return Reason.UNAUTHORIZED
    if status == 403 and ("pid" in lowered or "pixel" in lowered):
        return Reason.UNKNOWN_PIXEL
    if status in (400, 422):
        # Codes are undocumented: only the code or param says "too old"; a request-level
        # field (pid, validate_only, ...) is a configuration problem; any other 400/422 is
        # an event's rejection (the sender bisects to find it).
        if too_old(status, codes, params):
            return Reason.OUTSIDE_TIME_WINDOW
        return Reason.REQUEST_INVALID if r.request_field else Reason.INVALID_EVENT
    if code == TOO_OLD_CODE:
        return Reason.OUTSIDE_TIME_WINDOW
    if status == 404:
        return Reason.NOT_FOUND
    if status == 413:
        return Reason.TOO_LARGE
    if status == 429:
        return Reason.RATE_LIMITED
    if status >= 500:
        return Reason.SERVER_ERROR
    return Reason.UNEXPECTED


def _request_field(params: list[str | None], parsed: Any, message: str) -> str | None:
    """The request-level field (``pid``, ``validate_only``, ``integration_source``, or the
    ``events`` envelope itself; never ``events[i]``) that a 400/422 names: in its ``param``,
    a pydantic-style ``detail[].loc``, or its message. ``errors[].param`` describe an
    event's fields and never count."""
    param = params[0]
    if param and param.split(".", 1)[0] in REQUEST_FIELDS:
        return param[:100]
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    for d in detail if isinstance(detail, list) else []:
        loc: Any = d.get("loc") if isinstance(d, dict) else None
        if isinstance(loc, list) and len(loc) > 1 and loc[0] in ("query", "body"):
            named = loc[1] if loc[0] == "body" else "pid" if loc[1] == "pid" else None
            if named in REQUEST_FIELDS and not (len(loc) > 2 and isinstance(loc[2], int)):
                return ".".join(str(x) for x in loc[1:])[:100]
    m = _FIELD_IN_MESSAGE.search(message)
    return m.group(1) if m and m.group(1) in REQUEST_FIELDS else None


REQUEST_FIELDS = frozenset({"pid", "validate_only", "integration_source", "events"})
_FIELD_IN_MESSAGE = re.compile(
    r"(?:Missing required field:\s*|\('query',\s*')([A-Za-z_][A-Za-z0-9_]{0,63})"
)
MAX_BODY_DEPTH = 32


def _shallow(value: Any, limit: int = MAX_BODY_DEPTH) -> bool:
    """Whether a parsed body nests at most ``limit`` levels: a deeper one is kept as text,
    so that the dead letter holding it can always be read back."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for v in level
            if isinstance(v, dict | list)
            for child in (v.values() if isinstance(v, dict) else v)
        ]
        if not level:
            return True
    return False


def _details(error: Any, name: str) -> list[str | None]:
    """Field ``name`` (param or code) of each entry of ``error.errors``, where a string."""
    details = error.get("errors") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return []
    return [e[name] for e in details if isinstance(e, dict) and isinstance(e.get(name), str)]


def _event_indexes(params: list[str | None]) -> list[int]:
    """Every ``events[i]`` that ``param`` or an ``errors[].param`` names, in order, once each."""
    found: dict[int, None] = {}
    for param in params:
        if param and (m := _EVENT_INDEX.match(param)):
            found.setdefault(int(m.group(1)))
    return list(found)


def _missing_scopes(message: str) -> list[str]:
    m = _SCOPES.search(message)
    if not m:
        return []
    return [s.strip() for s in m.group(1).split(",") if s.strip()]


def http_pool(timeout_s: float, connections: int = 16) -> httpx.AsyncClient:
    """An HTTP connection pool for clients of the events endpoint (one per worker serves
    all its destinations: every pool costs a TLS context to set up)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


class ConversionsClient:
    """Sends batches to ``POST {base_url}/v1/events?pid=...`` with a Conversion Key."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        pixel_id: str,
        timeout_s: float = 30.0,
        integration_source: str | None = None,
        validate_only: bool = False,
        http: httpx.AsyncClient | None = None,
        labels: Labels | None = None,
    ) -> None:
        self.labels = labels or Labels()
        if problem := shape_problem(api_key):
            raise ConfigError(f"{self.labels.key} {problem} (the key is not shown)")
        self._key = api_key
        self.pixel_id = pixel_id
        self.url = base_url.rstrip("/") + EVENTS_PATH
        self.integration_source = integration_source
        # Test mode: batches go with validate_only (the API checks them, saves nothing).
        self.validate_only = validate_only
        self.key_fingerprint = fingerprint(api_key)
        self._own_http = http is None
        self._http = http or http_pool(timeout_s)
        if _in_clear(self.url):
            log.warning(
                "%s is plain http:// to a host that is not this machine: the Conversion Key "
                "and every event travel unencrypted; use https:// (http:// is meant for a "
                "local sandbox)",
                safe_url(self.url),
            )
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }

    @classmethod
    def for_destination(
        cls,
        destination: Destination,
        *,
        timeout_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> ConversionsClient:
        """A client for one destination: its URL, key, pixel and integration source, and
        guidance that names its settings. With ``http`` (a worker's shared connection
        pool, not closed by :meth:`aclose`) it opens no pool of its own."""
        return cls(
            base_url=destination.base_url,
            api_key=destination.api_key,
            pixel_id=destination.pixel_id,
            timeout_s=timeout_s,
            integration_source=destination.integration_source,
            validate_only=destination.validate_only,
            labels=Labels(destination.name, destination.key_source),
            http=http,
        )

    def __repr__(self) -> str:
        return (
            f"ConversionsClient(url={self.url!r}, pixel_id={self.pixel_id!r}, "
            f"key={self.key_fingerprint})"
        )

    async def __aenter__(self) -> ConversionsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._own_http:
            await self._http.aclose()

    async def send(self, events: Sequence[bytes], *, validate_only: bool = False) -> Accepted:
        """POST one batch once; return Accepted or raise the SendError of its failure class."""
        body = build_body(
            events, validate_only=validate_only, integration_source=self.integration_source
        )
        return await self.send_body(body)

    async def send_body(self, body: bytes) -> Accepted:
        """POST a prepared request body once (see :func:`build_body`)."""
        started = time.perf_counter()
        try:
            resp = await self._http.post(
                self.url, params={"pid": self.pixel_id}, content=body, headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise self._network_error(exc) from None
        elapsed = time.perf_counter() - started
        # An endpoint or proxy may echo the Authorization header: redact what was received
        # here, once, so that nothing stored or shown downstream can carry the key.
        headers = {k: redact(v, self._key) for k, v in resp.headers.items()}
        content = redact_bytes(resp.content, self._key)
        if 200 <= resp.status_code < 300:
            return Accepted(
                accepted_events=_accepted_count(content),
                status=resp.status_code,
                request_ids=request_ids(headers),
                elapsed_s=elapsed,
            )
        raise classify(resp.status_code, headers, content, self.key_fingerprint)

    def _network_error(self, exc: httpx.HTTPError) -> NetworkError:
        what = type(exc).__name__
        detail = redact(str(exc), self._key) or "no detail"
        return NetworkError(
            Response(message=f"{what}: {detail} ({self.url})"), key_fingerprint=self.key_fingerprint
        )


def _in_clear(url: str) -> bool:
    """Whether ``url`` is plain http to a host other than this machine's loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _accepted_count(content: bytes) -> int | None:
    try:
        parsed = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None
    value = parsed.get("accepted_events") if isinstance(parsed, dict) else None
    return value if isinstance(value, int) else None
