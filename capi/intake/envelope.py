"""The body of ``POST /v1/events``: its content type, its size, and the events in it.

Two forms are accepted:

- ``application/json``: ``{"events": [event, ...]}``, nothing else in the object;
- ``application/x-ndjson``: one event per line (blank lines are skipped).

A UTF-8 byte order mark at the start of either is skipped (as ``capi enqueue`` skips it).

A body that cannot be read as either is an :class:`EnvelopeError` carrying the HTTP status
to answer (400 malformed, 413 too large, 415 content type). In NDJSON a line that is not
JSON does not spoil its neighbours: it becomes a :class:`BadLine`, refused on its own like
any event that breaks a rule. Messages never quote the body (it may hold raw identifiers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

JSON = "application/json"
NDJSON = "application/x-ndjson"
_BOM = b"\xef\xbb\xbf"  # UTF-8's signature: skipped at the start of a body (RFC 8259 8.1)


class EnvelopeError(Exception):
    """Raised when a request body cannot be taken: ``status`` is the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class BadLine:
    """An NDJSON line that is not a JSON value: refused as an event, by its line number."""

    line: int
    why: str = ""
    kept: str | None = None  # ``why`` without the input it quotes (a key named twice)

    def rule(self) -> str:
        """Why it was refused."""
        return self.why or f"line {self.line} is not valid JSON"


def media_type(content_type: str | None) -> str:
    """The body's media type (``application/json``); EnvelopeError 415 if not accepted."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in (JSON, NDJSON):
        return kind
    what = "the request has no Content-Type"
    if kind:
        what = f"Content-Type {kind[:60]!r} is not accepted"
    raise EnvelopeError(
        415,
        "unsupported_media_type",
        f'{what}; send {JSON} ({{"events": [...]}}) or {NDJSON} (one event per line)',
    )


def too_large(limit: int) -> EnvelopeError:
    """The 413 for a body over ``limit`` bytes."""
    return EnvelopeError(
        413,
        "body_too_large",
        f"the body is over {limit:,} bytes (CAPI_INTAKE_MAX_BODY_BYTES); send fewer events "
        "per request",
    )


def events_of(body: bytes, kind: str, max_events: int) -> list[Any]:
    """The events of a body of media type ``kind``; EnvelopeError if it is malformed or
    holds more than ``max_events`` (NDJSON is counted while it is split: parsing stops at
    the first line past the limit). A UTF-8 byte order mark at the very start (a file saved
    by a Windows editor, posted as is) is skipped, as ``capi enqueue`` skips it."""
    body = body.removeprefix(_BOM)
    if kind == JSON:
        events = _json_events(body)
        if len(events) > max_events:
            raise too_many(max_events)
        try:  # read again, strictly, once the count is known to be within bounds
            _check_unique_keys(body, {"events": events})  # the envelope as parsed
        except DuplicateKey as exc:
            raise EnvelopeError(400, "malformed", f"the body {exc}") from None
        return events
    return _ndjson_events(body, max_events)


class DuplicateKey(ValueError):
    """A JSON object names a key twice (a parser keeps one of them: which is ambiguous), or
    the text nests too deeply for the strict parse to tell. ``kept`` is the message
    without the key, which is the client's (for the live-outcomes ring)."""

    def __init__(self, message: str, kept: str | None = None) -> None:
        super().__init__(message)
        self.kept = message if kept is None else kept


# A key is a string followed by a colon: each key of a JSON text ends where this matches
# (its closing quote), and a match elsewhere can only be inside a string value.
_KEY_END = re.compile(rb'"\s*:')


def _check_unique_keys(text: bytes, parsed: Any) -> None:
    """DuplicateKey if an object of ``text`` (already parsed as ``parsed``, which kept one
    value per key) names a key twice. Quick when it cannot: the text holds at least as many
    :data:`_KEY_END` matches as keys, and ``parsed`` lost one key per duplicate, so equal
    counts mean no duplicate; otherwise :func:`_strict` reads it again to say which."""
    if len(_KEY_END.findall(text)) != _keys_in(parsed):
        _strict(text)


def _keys_in(value: Any) -> int:
    """The number of object keys in a parsed JSON value, nested ones included."""
    count, todo = 0, [value]
    while todo:
        item = todo.pop()
        if type(item) is dict:
            count += len(item)
            todo.extend(item.values())
        elif type(item) is list:
            todo.extend(item)
    return count


def _strict(text: bytes) -> Any:
    """``text`` parsed with a check that no object names a key twice, as ``capi enqueue``
    refuses such a line; DuplicateKey names the key. (orjson, which keeps the last, has
    already refused invalid JSON and measured the nesting.)"""
    try:
        return _STRICT.decode(text.decode())
    except RecursionError:  # orjson reads 1,024 levels; Python's parser, under 1,000
        raise DuplicateKey(
            "nests too deeply to be checked for a key named twice; send fewer levels"
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKey(
            f"names the key {twice[:40]!r} twice in one object; send it once",
            "names a key twice in one object; send it once",
        )
    return found


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys)


def too_many(max_events: int) -> EnvelopeError:
    """The 413 for a body of more than ``max_events`` events."""
    return EnvelopeError(
        413,
        "too_many_events",
        f"the body holds more than {max_events:,} events; at most {max_events:,} per "
        "request (CAPI_INTAKE_MAX_EVENTS)",
    )


def _json_events(body: bytes) -> list[Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not body.strip():
            raise EnvelopeError(
                400, "malformed", 'the body is empty; send a JSON object {"events": [...]}'
            ) from None
        raise EnvelopeError(
            400, "malformed", f"the body is not valid JSON ({_where(exc)})"
        ) from None
    if not isinstance(data, dict) or "events" not in data:
        raise EnvelopeError(400, "malformed", 'the body must be a JSON object {"events": [...]}')
    if not isinstance(data["events"], list):
        raise EnvelopeError(400, "malformed", "events: must be a list of event objects")
    extra = sorted(k for k in data if k != "events")
    if extra:
        raise EnvelopeError(
            400,
            "malformed",
            f"{extra[0][:40]!r} is not a field of the envelope; it holds only events "
            "(name the destination as ?destination=NAME)",
        )
    events: list[Any] = data["events"]
    return events


# A byte that makes an NDJSON line not blank (bytes.strip() removes the others).
_CONTENT = re.compile(rb"[^ \t\n\r\x0b\x0c]")


def _ndjson_events(body: bytes, max_events: int) -> list[Any]:
    """The events of an NDJSON body; blank lines are skipped a run at a time (one at a
    time, 4 MB of newlines cost 0.5 s of the event loop: they count toward no limit)."""
    events: list[Any] = []
    start, number = 0, 1  # the line that begins at start
    while (found := _CONTENT.search(body, start)) is not None:
        begin = body.rfind(b"\n", start, found.start()) + 1 or start
        number += body.count(b"\n", start, begin)
        end = body.find(b"\n", found.start())
        end = len(body) if end < 0 else end
        line, start = body[begin:end], end + 1
        if len(events) == max_events:
            _refuse_if_pretty_printed(events, body)  # its lines are not events: not too many
            raise too_many(max_events)
        try:
            events.append(orjson.loads(line))
            _check_unique_keys(line, events[-1])
        except orjson.JSONDecodeError:
            events.append(BadLine(number))
        except DuplicateKey as exc:
            events[-1] = BadLine(number, f"line {number} {exc}", f"line {number} {exc.kept}")
        number += 1
    if not events:
        raise EnvelopeError(400, "malformed", "the body holds no event (one JSON object a line)")
    if len(events) > 1:
        _refuse_if_pretty_printed(events, body)
    return events


def _refuse_if_pretty_printed(lines: list[Any], body: bytes) -> None:
    """The 400 for one JSON value over several lines sent as NDJSON: some ``lines`` are not
    JSON, and the whole ``body`` is (an NDJSON body of several lines never is)."""
    if not any(isinstance(line, BadLine) for line in lines):
        return
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    raise EnvelopeError(
        400,
        "malformed",
        "the body is one JSON value over several lines (pretty-printed?), not NDJSON (one "
        'JSON object a line): send it with Content-Type: application/json as {"events": '
        "[...]}, or each event on a line of its own",
    )


def _where(exc: orjson.JSONDecodeError) -> str:
    """Where parsing failed (line and column), without the text around it."""
    return f"line {exc.lineno}, column {exc.colno}"
