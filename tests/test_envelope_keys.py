"""The intake's duplicate-key check: its quick count (capi.intake.envelope) refuses exactly
the bodies a strict parse refuses, whatever the keys, their whitespace, or strings that
look like keys (``"\\":"``) hold."""

from __future__ import annotations

import json
from typing import Any

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
