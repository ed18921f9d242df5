"""The quick paths behind prepare() decide exactly as the careful code they stand in for.

- the quick plain-JSON walk (capi.jsondata) returns the careful walk's copy or gives up, and
  prepare() queues the same JSON or refuses with the same words with the careful walk alone;
- the regular expressions that replaced per-character loops accept the same characters,
  checked over every code point.
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import capi.events
from capi import jsondata, schema
from capi.errors import EventRejected
from capi.events import now_ms, prepare
from capi.hashing import _WHITESPACE, is_sha256_hex, normalize_email
from tests.helpers import events
from tests.test_fuzz import mutated_events

EVERY_CHARACTER = "".join(map(chr, range(sys.maxunicode + 1)))


def careful(value: Any, max_bytes: int) -> Any:
    """The careful walk alone, as plain_copy was before the quick walk."""
    return jsondata._copy(value, None, 1, jsondata._Budget(max_bytes))


def outcome(call: Any) -> tuple[str, Any]:
    try:
        return "copy", call()
    except EventRejected as exc:
        return "refused", [str(p) for p in exc.problems]


class Text(str):
    pass


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats()
    | st.text(st.characters(codec=None, categories=None), max_size=12)
    | st.builds(Text, st.text(max_size=4))
    | st.binary(max_size=4)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children)
        | st.dictionaries(st.text(max_size=6) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, max_size=5), st.integers(2, 400))
def test_the_quick_walk_copies_or_refuses_exactly_as_the_careful_walk(
    value: dict[str, Any], max_bytes: int
) -> None:
    quick = outcome(lambda: jsondata.plain_copy(value, max_bytes=max_bytes))
    slow = outcome(lambda: careful(value, max_bytes))
    assert quick == slow
    if quick[0] == "copy":  # the same types, not only equal values (True == 1)
        assert json.dumps(quick[1]) == json.dumps(slow[1])


@pytest.mark.parametrize("depth", [jsondata.MAX_DEPTH - 2, jsondata.MAX_DEPTH - 1])
def test_the_quick_walk_keeps_the_depth_limit(depth: int) -> None:
    nested: Any = []
    for _ in range(depth - 1):
        nested = [nested]
    event = {"x": nested}  # the event is level 1, its lists levels 2..depth+1
    quick = outcome(lambda: jsondata.plain_copy(event, max_bytes=10_000))
    assert quick == outcome(lambda: careful(event, 10_000))
    assert quick[0] == ("copy" if depth + 1 <= jsondata.MAX_DEPTH else "refused")


@pytest.mark.parametrize("max_bytes", range(2, 200, 7))
def test_the_quick_walk_keeps_the_byte_budget(max_bytes: int) -> None:
    for event in events(2):
        quick = outcome(lambda event=event: jsondata.plain_copy(event, max_bytes=max_bytes))
        assert quick == outcome(lambda event=event: careful(event, max_bytes))


def test_prepared_json_is_what_the_careful_walk_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = events(50)
    quick = [prepare(e).json for e in sample]
    monkeypatch.setattr(capi.events, "plain_copy", careful)  # the careful walk only
    assert [prepare(e).json for e in sample] == quick


def test_control_characters_are_unicode_category_cc() -> None:
    found = "".join(c for c in EVERY_CHARACTER if schema._CONTROL.fullmatch(c))
    assert found == "".join(c for c in EVERY_CHARACTER if unicodedata.category(c) == "Cc")


def test_whitespace_pattern_is_str_isspace() -> None:
    found = "".join(c for c in EVERY_CHARACTER if _WHITESPACE.fullmatch(c))
    assert found == "".join(c for c in EVERY_CHARACTER if c.isspace())


@given(st.text(st.sampled_from("0123456789abcdefABCDEFg٣ \n"), min_size=60, max_size=66))
def test_sha256_shape_is_64_hex_characters(value: str) -> None:
    hex_digits = frozenset("0123456789abcdefABCDEF")
    assert is_sha256_hex(value) == (len(value) == 64 and all(c in hex_digits for c in value))


@pytest.mark.parametrize("space", ["\u00a0", "\u2003", "\u3000", "\x1c", "\x85"])
def test_an_email_with_any_unicode_space_is_refused(space: str) -> None:
    with pytest.raises(ValueError, match="must be an email address"):
        normalize_email(f"ada{space}x@example.com")


@pytest.mark.parametrize(
    "value",
    [
        {"id": "a\ud800"},  # a lone surrogate as text
        {"a\udfff": 1},  # and as a key
        {"x": ("t",)},  # a tuple becomes a list
        {"x": Text("s")},  # a str subclass becomes str
        {"x": True, "y": 2**63 - 1, "z": -(2**63), "f": 1.5},  # plain and at the bounds
        {"x": 2**63},
        {"x": float("-inf")},
    ],
)
def test_the_quick_walk_on_each_unusual_value(value: dict[str, Any]) -> None:
    quick = outcome(lambda: jsondata.plain_copy(value, max_bytes=1000))
    assert quick == outcome(lambda: careful(value, 1000))
    if quick[0] == "copy":
        assert [type(v) for v in quick[1].values()] == [
            type(v) for v in careful(value, 1000).values()
        ]


def test_prepared_json_is_pydantics_own_serialization() -> None:
    sample = [
        *events(4),
        {
            "id": "c-1",
            "type": "custom",
            "custom_event_name": "quiz",
            "timestamp_ms": now_ms(),
            "action_source": "offline",
            "user": {"email": "a@example.com", "first_name": "José", "ip_address": "::1"},
            "data": {"type": "custom", "amount": 1, "currency": "eur", "x": [1.5, None, "é"]},
        },
    ]
    for event in sample:
        prepared = prepare(event)
        assert prepared.json == prepared.event.model_dump_json(exclude_none=True).encode()


NOW_S = time.time()  # one clock for both runs; the generated events are stamped after it


def prepared_or_refused(event: Any) -> tuple[str, Any]:
    try:
        return "queued", prepare(event, clock=lambda: NOW_S).json
    except EventRejected as exc:
        return "refused", str(exc)


@st.composite
def varied_events(draw: Any) -> dict[str, Any]:
    """The helpers' events with more identifiers and items: mostly valid, some not."""
    event = events(1, start=draw(st.integers(0, 10**6)))[0]
    for field in ("first_name", "last_name", "external_id", "phone"):
        if draw(st.booleans()):
            event["user"][field] = draw(st.text(max_size=16))
    if draw(st.booleans()):
        item = {"id": draw(st.text(max_size=6)), "quantity": draw(st.integers(-1, 3))}
        event["data"]["contents"] = [item]
    if draw(st.booleans()):
        event["source_url"] = draw(st.sampled_from(["https://u:p@a.example/x?q=1#f", "/x"]))
    return event


@settings(max_examples=300, deadline=None)
@given(
    varied_events()
    | mutated_events()
    | st.builds(lambda e, v: {**e, "data": v}, mutated_events(), values)
)
def test_prepare_decides_as_with_the_careful_walk_alone(event: Any) -> None:
    quick = prepared_or_refused(event)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capi.events, "plain_copy", careful)
        assert prepared_or_refused(event) == quick
