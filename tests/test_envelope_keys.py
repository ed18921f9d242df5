"""The intake's duplicate-key check: its quick count (capi.intake.envelope) refuses exactly
the bodies a strict parse refuses, whatever the keys, their whitespace, or strings that
look like keys (``"\\":"``) hold."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from capi.intake import envelope

KEYS = st.sampled_from(["id", "a", "b", 'q":', 'x\\":', ":", '"', "é", "id "])
SPACE = st.sampled_from(["", " ", "\t", "\n ", "\r\n"])
SCALARS = st.one_of(
    st.integers(-5, 5),
    st.sampled_from(["", '":', '\\":', 'a\\":1', "}{", '"id":']),
    st.booleans(),
    st.none(),
)


@st.composite
def texts(draw: Any, depth: int = 0) -> str:
    """JSON text of an object whose keys may repeat, written with odd whitespace."""
    pairs = []
    for _ in range(draw(st.integers(0, 4))):
        key = json.dumps(draw(KEYS))
        if depth < 2 and draw(st.booleans()):
            value = draw(texts(depth + 1))
        elif draw(st.booleans()):
            value = "[" + ",".join(json.dumps(draw(SCALARS)) for _ in range(2)) + "]"
        else:
            value = json.dumps(draw(SCALARS))
        pairs.append(f"{key}{draw(SPACE)}:{draw(SPACE)}{value}")
    return "{" + ",".join(pairs) + "}"


def strictly_unique(text: str) -> bool:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("twice")
        return dict(pairs)

    try:
        json.loads(text, object_pairs_hook=hook)
    except ValueError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(texts(), max_size=3))
def test_a_body_is_refused_for_a_repeated_key_exactly_when_a_strict_parse_finds_one(
    events: list[str],
) -> None:
    body = ('{"events": [' + ",".join(events) + "]}").encode()
    lines = [t.replace("\n", " ").replace("\r", " ") for t in events]  # one object a line
    ndjson = "\n".join(lines).encode()
    unique = strictly_unique(body.decode())
    try:
        envelope.events_of(body, envelope.JSON, 1000)
        refused = False
    except envelope.EnvelopeError as exc:
        refused = True
        assert "twice in one object" in exc.message
    assert refused == (not unique), body
    if events:
        read = envelope.events_of(ndjson, envelope.NDJSON, 1000)
        bad = [isinstance(e, envelope.BadLine) for e in read]
        assert bad == [not strictly_unique(t) for t in lines], ndjson


def test_a_body_too_deep_for_the_strict_parse_is_refused_not_a_crash() -> None:
    """orjson reads up to 1,024 levels, Python's json under 1,000: a body in between that
    needs the strict parse (a repeated key, or a string like ``":``) raised RecursionError,
    answered 500 with a traceback logged; it is a 400 (an NDJSON line: refused alone)."""
    deep = "[" * 1_000 + "]" * 1_000
    event = '{"id": "a", "id": "b", "data": ' + deep + "}"
    try:
        envelope.events_of(('{"events": [' + event + "]}").encode(), envelope.JSON, 10)
    except envelope.EnvelopeError as exc:
        assert (exc.status, exc.code) == (400, "malformed")
        assert "nests too deeply" in exc.message
    else:
        raise AssertionError("a body too deep to check was taken")
    lines = envelope.events_of(('{"id": "c"}\n' + event).encode(), envelope.NDJSON, 10)
    assert lines[0] == {"id": "c"}
    assert isinstance(lines[1], envelope.BadLine) and "nests too deeply" in lines[1].rule()


def _ndjson_one_line_at_a_time(body: bytes, max_events: int) -> list[Any]:
    """NDJSON as split before blank lines were skipped a run at a time (the reference)."""
    events: list[Any] = []
    start, number = 0, 0
    while start <= len(body):
        end = body.find(b"\n", start)
        end = len(body) if end < 0 else end
        line, start, number = body[start:end], end + 1, number + 1
        if not line.strip():
            continue
        if len(events) == max_events:
            raise envelope.too_many(max_events)
        try:
            events.append(orjson.loads(line))
            envelope._check_unique_keys(line, events[-1])
        except orjson.JSONDecodeError:
            events.append(envelope.BadLine(number))
        except envelope.DuplicateKey as exc:
            events[-1] = envelope.BadLine(
                number, f"line {number} {exc}", f"line {number} {exc.kept}"
            )
    return events


PIECES = st.sampled_from(["\n", " ", "\r", "\t", "\x0b", "{}", "x", '{"a": 1}', '{"a":1,"a":2}'])


@given(st.lists(PIECES, max_size=30))
@settings(max_examples=300, deadline=None)
def test_ndjson_lines_keep_their_numbers_when_blank_runs_are_skipped(pieces: list[str]) -> None:
    body = "".join(pieces).encode()
    try:
        expected: Any = _ndjson_one_line_at_a_time(body, 3)
    except envelope.EnvelopeError as exc:
        expected = exc.code
    try:
        got: Any = envelope.events_of(body, envelope.NDJSON, 3)
    except envelope.EnvelopeError as exc:
        got = exc.code
    assert got == (expected or "malformed")


def test_four_megabytes_of_blank_ndjson_lines_cost_no_more_than_a_line() -> None:
    """Blank lines count toward no limit: read one at a time, 4 MB of them held the event
    loop for half a second (more than the 4 MB JSON worst case docs/intake-security.md
    states)."""
    for body in (b"\n" * 3_999_000, b" \r\n" * 1_333_000, b"\n" * 3_999_000 + b"{}"):
        started = time.process_time()
        try:
            envelope.events_of(body, envelope.NDJSON, 1000)
        except envelope.EnvelopeError as exc:
            assert exc.message.startswith("the body holds no event")
        assert time.process_time() - started < 0.05
