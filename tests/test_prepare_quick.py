"""The quick path of prepare() (capi.quick) decides exactly as the careful path alone.

For every event, generated valid and invalid over every field the quick path reads, and
the fuzz tests' mutated events: prepare() queues the same bytes with the same warnings,
consent, id, name, time, coverage mask and model (fields set included), or refuses with
the same problems and id; it reads the clock as often; the input is never changed.
"""

from __future__ import annotations

import copy
import sys
import time
import tracemalloc
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from capi import coverage, quick, schema
from capi.errors import EventRejected
from capi.events import prepare
from tests.benchmarks.bench import sample_events
from tests.helpers import events
from tests.test_fuzz import json_values, mutated_events

NOW_S = time.time()  # one clock for both paths; the helpers' events are stamped after it
NOW_MS = int(NOW_S * 1000)
HEX = "0123456789abcdef"


def fields_set(model: Any) -> Any:
    """Every model's fields set, nested (pydantic's == leaves them out)."""
    if isinstance(model, BaseModel):
        return (
            type(model).__name__,
            sorted(model.model_fields_set),
            {name: fields_set(getattr(model, name)) for name in type(model).model_fields},
        )
    if isinstance(model, list):
        return [fields_set(v) for v in model]
    return model


def outcome(raw: Any, **options: Any) -> tuple[Any, ...]:
    """What prepare() decides, everything a caller can see of it, and the clock reads."""
    reads: list[float] = []

    def clock() -> float:
        reads.append(NOW_S)
        return NOW_S

    before = copy.deepcopy(raw)
    try:
        p = prepare(raw, clock=clock, **options)
    except EventRejected as exc:
        seen: tuple[Any, ...] = ("refused", [str(x) for x in exc.problems], exc.event_id)
    else:
        event = p.event
        seen = (
            "queued",
            p.json,
            p.warnings,
            p.consent,
            (p.id, p.name, p.timestamp_ms, p.mask),
            event,
            fields_set(event),
            event.to_json(),
        )
    assert repr(raw) == repr(before), "prepare() changed its input"  # NaN != NaN
    return (*seen, len(reads))


def careful_outcome(raw: Any, **options: Any) -> tuple[Any, ...]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quick, "sent", lambda raw, hash_identifiers: None)
        return outcome(raw, **options)


class Text(str):
    pass


ODD = st.none() | st.integers(-2, 2) | st.floats() | st.builds(Text, st.text(max_size=3))


class Faults:
    """Where an event's values are drawn invalid: nowhere, at one place (the n-th value
    drawn, so that every field gets its turn), or anywhere, one in eight."""

    def __init__(self, at: int | None) -> None:
        self.at = at  # None: anywhere
        self.seen = 0

    def take(self, draw: Any) -> bool:
        """Whether to break the value drawn now."""
        self.seen += 1
        if self.at is None:
            return bool(draw(st.integers(1, 8)) == 1)
        return self.seen == self.at


class Pool:
    """A field's values: valid ones, and invalid or odd ones for a fault."""

    def __init__(self, valid: list[Any], invalid: tuple[Any, ...] = ()) -> None:
        self.valid = st.sampled_from(valid)
        bad = st.sampled_from([*invalid] or valid)
        self.mixed = st.one_of(bad, bad, bad, ODD)

    def one(self, draw: Any, broken: Faults) -> Any:
        return draw(self.mixed if broken.take(draw) else self.valid)

    def some(self, draw: Any, broken: Faults, max_size: int = 5) -> Any:
        if broken.take(draw):
            return draw(ODD)
        return [self.one(draw, broken) for _ in range(draw(st.integers(0, max_size)))]


HASHES = [HEX * 4, HEX.upper() * 4, "0" * 64, HEX[::-1] * 4]
EMAILS = Pool(["ada@example.com", " Ada@Example.COM ", "b@x.io", "\u200bc@x.io"], ("bad", "a@b@c"))
PHONES = Pool(["+1 (415) 555-0100", "0044 20 7946 0000", "+1-415-555-0100"], ("123", "x"))
IDS = Pool(["u-1", " U-1 ", "Zz"], ("", "   ", "a" * 64))
NAMES = Pool(["José", "Ana-María", " O'Neil ", "Zoë"], ("a@b.c", "!!"))
SHA = Pool(HASHES, ("", "abc", " " + HEX * 4, "g" * 64))
PLACES = Pool(["California", " Berlin ", "Île-de-France"], ("", "   ", "x" * 129))
POSTAL = Pool(["94103", "SW1A 1AA"], ("", "94103!", "x" * 33))
COUNTRIES = Pool(["us", "US", "de"], (" us", "xx", "USA", ""))
IPS = Pool(["203.0.113.9", " ::1 ", "2001:DB8::0001", "::ffff:1.2.3.4"], ("256.1.1.1", ""))
TEXTS = Pool(["Mozilla/5.0", "fb.1.1596403881668.1116446470", "é\u2028\x7f"], ("  ", ""))
GAIDS = Pool(
    ["38400000-8cf0-11bd-b23e-10b96e40000d", "38400000-8CF0-11BD-B23E-10B96E40000D"], ("idfa",)
)
CURRENCIES = Pool(["USD", "usd", "JPY", "KWD", "CLF"], ("XAU", "EURO", "", "us"))
AMOUNTS = Pool([0, 1999, 2**63 - 1], (-1, 2**63, 2**64, True))
VALUES = Pool(["129.99", "12", " 5 ", "-0", 7], ("1.005", "-1", "1e3", "", 12.5, Decimal(1), 2**70))
URLS = Pool(
    [
        "https://shop.example/thanks",
        "https://shop.example/p?oppref=click-1&x=2#top",
        "https://u:pw@shop.example:8443/a?oppref=",
        "http://shop.example/?oppref=a%20b+c",
    ],
    ("ftp://shop.example/", "/relative", "https://:443/"),
)
EVENT_IDS = Pool(["e-1", "é-2", "x" * 300], (" ", "", "a\nb"))
SOURCES = Pool(["web", "mobile_app", "offline"], ("app",))
OPPREFS = Pool(["given"], ("",))
CONSENTS = Pool(["granted", "denied"], ("yes",))
BOOLS = Pool([True, False])
RAW = {"email": EMAILS, "phone": PHONES, "external_id": IDS, "first_name": NAMES}
RAW |= {"last_name": NAMES}
LISTS = {name: SHA for name in schema.User.model_fields if name.endswith("_sha256")}
LISTS |= {"regions": PLACES, "postal_codes": POSTAL, "cities": PLACES, "countries": COUNTRIES}
SCALARS = {"ip_address": IPS, "user_agent": TEXTS, "obref": TEXTS}
SCALARS |= {"android_advertising_id": GAIDS}


@st.composite
def users(draw: Any, broken: Faults) -> dict[str, Any]:
    names = sorted([*RAW, *LISTS, *SCALARS])
    if broken.take(draw):
        names += ["email_sha256", "nickname"]  # a legacy name, an unknown field
    user: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=6, unique=True)):
        if name in RAW:
            many = draw(st.booleans())
            user[name] = RAW[name].some(draw, broken) if many else RAW[name].one(draw, broken)
        elif name in LISTS:
            user[name] = LISTS[name].some(draw, broken)
        elif name in SCALARS:
            user[name] = SCALARS[name].one(draw, broken)
        else:
            user[name] = draw(st.text(max_size=3))
    return user


ITEM_FIELDS = {"amount": AMOUNTS, "currency": CURRENCIES, "value": VALUES, "quantity": AMOUNTS}
ITEM_FIELDS |= {name: IDS for name in ("id", "group_id", "name", "content_type")}
DATA_FIELDS = {"amount": AMOUNTS, "currency": CURRENCIES, "value": VALUES, "plan_id": IDS}


TAG_FIELDS = {
    "customer_action": ["amount", "currency", "value"],
    "contents": ["amount", "currency", "value", "contents"],
    "plan_enrollment": ["amount", "currency", "value", "plan_id", "contents"],
}


@st.composite
def priced(draw: Any, broken: Faults, fields: dict[str, Pool], names: list[str]) -> dict[str, Any]:
    chosen = set(draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True)))
    if not broken.take(draw):  # one of amount and value, with a currency
        chosen.discard(draw(st.sampled_from(["amount", "value"])))
        if chosen & {"amount", "value"} and not broken.take(draw):
            chosen.add("currency")
    return {name: fields[name].one(draw, broken) for name in sorted(chosen) if name in fields}


@st.composite
def items(draw: Any, broken: Faults) -> dict[str, Any]:
    item = draw(priced(broken, ITEM_FIELDS, sorted(ITEM_FIELDS)))
    if draw(st.integers(0, 4)) == 0:
        values = st.text(max_size=3) | ODD if broken.take(draw) else st.text(max_size=3)
        item["variant_dict"] = draw(st.dictionaries(st.text(max_size=3), values, max_size=3))
    return item


@st.composite
def datas(draw: Any, broken: Faults, event_type: str) -> dict[str, Any]:
    tag = schema.DATA_TYPE_OF.get(event_type, "contents")
    names = TAG_FIELDS.get(tag, TAG_FIELDS["plan_enrollment"])
    if broken.take(draw):
        tag = draw(st.sampled_from(["contents", "custom", "nope"]))
    if broken.take(draw):
        names = TAG_FIELDS["plan_enrollment"]
    data = {"type": tag, **draw(priced(broken, DATA_FIELDS, names))}
    if "contents" in names and draw(st.booleans()):
        contents = [draw(items(broken)) for _ in range(draw(st.integers(0, 3)))]
        data["contents"] = draw(ODD) if broken.take(draw) else contents
    return data


TIMESTAMPS = Pool(
    [NOW_MS, NOW_MS - 1000], (NOW_MS - 8 * 86_400_000, NOW_MS + 3_600_000, NOW_MS // 1000)
)
OPTIONAL = {"source_url": URLS, "action_source": SOURCES, "oppref": OPPREFS}
OPTIONAL |= {"opt_out": BOOLS, "consent": CONSENTS}


@st.composite
def api_events(draw: Any) -> dict[str, Any]:
    """Events over every field the quick path reads, with values from the fields' pools:
    valid, or with one fault (the quick path must see it), or with many."""
    broken = Faults(draw(st.none() | st.integers(0, 40)))
    event_type = Pool(list(schema.DATA_TYPE_OF), ("purchase",)).one(draw, broken)
    event: dict[str, Any] = {
        "id": EVENT_IDS.one(draw, broken),
        "type": event_type,
        "timestamp_ms": TIMESTAMPS.one(draw, broken),
        "data": draw(datas(broken, event_type if isinstance(event_type, str) else "")),
    }
    for name in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), max_size=5, unique=True)):
        event[name] = OPTIONAL[name].one(draw, broken)
    if event_type in schema.APP_EVENT_TYPES and not broken.take(draw):
        event["action_source"] = "mobile_app"
    if event.get("action_source") == "web" and not broken.take(draw):
        event["source_url"] = URLS.one(draw, broken)
    if draw(st.booleans()):
        event["user"] = draw(ODD) if broken.take(draw) else draw(users(broken))
    if broken.take(draw):
        event[draw(st.sampled_from(["custom_event_name", "extra"]))] = draw(json_values)
    if draw(st.integers(0, 3)) == 0:  # shuffle the keys: the sent order is the schema's
        keys = draw(st.permutations(sorted(event)))
        event = {k: event[k] for k in keys}
    return event


OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "hash_identifiers": st.booleans(),
        "check_time": st.booleans(),
        "strict_identifiers": st.booleans(),
    },
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api_events() | mutated_events(), OPTIONS)
def test_the_quick_path_decides_as_the_careful_path(event: Any, options: dict[str, Any]) -> None:
    assert outcome(event, **options) == careful_outcome(event, **options)


def test_the_generated_events_take_the_quick_path_often_enough() -> None:
    """The property above tests the quick path only where it answers: it must answer often."""
    taken = 0

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(api_events())
    def count(event: dict[str, Any]) -> None:
        nonlocal taken
        taken += quick.sent(event, True) is not None

    count()
    assert taken >= 100  # 133 of the 400 (derandomized: always the same 400)


RICH = {
    "id": "all-1",
    "type": "subscription_created",
    "timestamp_ms": NOW_MS,
    "source_url": "https://shop.example/p?oppref=from-url",
    "action_source": "web",
    "opt_out": False,
    "consent": "granted",
    "user": {
        "countries": ["us", "US", "de"],
        "email": ["A@x.io", "a@x.io", "b@x.io", "c@x.io", "d@x.io"],
        "emails_sha256": [HEX * 4],
        "ip_address": " 2001:DB8::1 ",
        "regions": ["CA"],
        "cities": ["SF"],
        "postal_codes": ["94103"],
        "user_agent": "UA/1",
        "obref": "ob",
        "android_advertising_id": "38400000-8CF0-11BD-B23E-10B96E40000D",
        "phone": "+1 415 555 0100",
        "first_name": "Zoë",
        "last_name": ["Ng"],
        "external_id": "u-1",
        "first_names_sha256": [HEX * 4],
    },
    "data": {
        "type": "plan_enrollment",
        "plan_id": "gold",
        "currency": "kwd",
        "value": "1.5",
        "contents": [
            {"variant_dict": {"size": "M"}, "value": "2", "quantity": 2, "id": "a"},
            {"currency": "JPY", "value": "800", "name": "n", "content_type": "c"},
        ],
    },
}
APP = {
    "id": "app-1",
    "type": "app_installed",
    "timestamp_ms": NOW_MS,
    "action_source": "mobile_app",
    "user": {"android_advertising_id": "38400000-8cf0-11bd-b23e-10b96e40000d"},
    "data": {"type": "customer_action", "amount": 5, "currency": "USD"},
}
PRICED = {
    "id": "p-1",
    "type": "order_created",
    "timestamp_ms": NOW_MS,
    "oppref": "given",
    "source_url": "https://shop.example/thanks",
    "user": {"email": "a@x.io"},
    "data": {
        "type": "contents",
        "amount": 1999,
        "currency": "USD",
        "contents": [{"amount": 1999, "group_id": "g", "quantity": 0}],
    },
}
ITEMS = {
    "id": "i-1",
    "type": "items_added",
    "timestamp_ms": NOW_MS,
    "action_source": "offline",
    "data": {"type": "contents", "contents": [{"amount": 5, "currency": "eur"}]},
}
RAW_ONLY = {  # raw identifiers only, in another order than the hashed fields'
    "id": "r-1",
    "type": "lead_created",
    "timestamp_ms": NOW_MS,
    "action_source": "email",
    "user": {"external_id": "u-1", "phone": "+1 415 555 0100", "email": ["a@x.io", "b@x.io"]},
    "data": {"type": "customer_action"},
}
VALID = [*events(6), *sample_events(4, "q"), RICH, APP, PRICED, ITEMS, RAW_ONLY]


@pytest.mark.parametrize("event", VALID)
def test_plain_valid_events_take_the_quick_path_and_decide_the_same(event: Any) -> None:
    assert isinstance(prepare(event, clock=lambda: NOW_S).data, dict)  # the quick path
    assert outcome(event) == careful_outcome(event)


ABSENT = object()  # a fault that takes the field out
ANY = [None, 1, 1.5, True, "x", [], {}, Text("a"), ABSENT]
FAULTS: dict[str, list[Any]] = {
    "id": [" ", "", "a\nb", "\x85"],
    "type": ["purchase", "custom", "order_created", "app_opened", "registration_completed"],
    "timestamp_ms": [NOW_MS // 1000, NOW_MS - 8 * 86_400_000, NOW_MS + 3_600_000, 2**63],
    "source_url": ["ftp://x/", "/relative", "https://:443/", "https://x/?oppref="],
    "action_source": ["app", "web", "mobile_app", "offline"],
    "oppref": [""],
    "consent": ["yes", "denied"],
    "custom_event_name": ["quiz"],
    "extra": [1],
    "user.email": ["bad", ["bad"], [], "a" * 64, ["a@x.io", 1]],
    "user.phone": ["123", ["+1 415 555 0100", "x"]],
    "user.external_id": ["  ", [""]],
    "user.first_name": ["a@b.c", "!!"],
    "user.last_name": [["!!"], "Ng"],
    "user.emails_sha256": [["abc"], [" " + HEX * 4], ["g" * 64], "0" * 64, [HEX * 4] * 5],
    "user.first_names_sha256": [[HEX * 4, "bad"]],
    "user.regions": [[""], ["   "], ["x" * 129], ["ok", 1]],
    "user.postal_codes": [[""], ["94103!"], ["x" * 33]],
    "user.cities": [[" "]],
    "user.countries": [["xx"], [" us"], ["USA"], ["us", "US", "de", "fr", "it"]],
    "user.ip_address": ["256.1.1.1", "", ["1.2.3.4"]],
    "user.user_agent": ["  ", ""],
    "user.obref": [" "],
    "user.android_advertising_id": ["idfa", "", "00000000-0000-0000-0000-000000000000"],
    "user.email_sha256": [HEX * 4],
    "user.nickname": ["n"],
    "data.type": ["contents", "custom", "nope", "plan_enrollment", "customer_action"],
    "data.amount": [-1, 2**63, 2**64, 7],
    "data.currency": ["XAU", "EURO", "", "us"],
    "data.value": ["1.005", "-1", "1e3", "", 12.5, 2**70, "3"],
    "data.plan_id": [""],
    "data.contents": [[1], [{}], [{"x": 1}]],
    "data.contents.0.amount": [-1, 2**63, 5],
    "data.contents.0.currency": ["XAU", "EURO", "usd"],
    "data.contents.0.value": ["1.005", "x", 2**64, "4"],
    "data.contents.0.id": [""],
    "data.contents.0.quantity": [-1, 2**63],
    "data.contents.0.variant_dict": [{"a": 1}, {"a": None}, {}],
}


def with_fault(event: dict[str, Any], path: str, value: Any) -> dict[str, Any] | None:
    """``event`` (copied) with ``value`` at ``path``; None where the path has no parent."""
    out = copy.deepcopy(event)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.get(part)
        if not isinstance(node, dict | list) or (isinstance(node, list) and not node):
            return None
    if isinstance(node, list):
        return None
    if value is ABSENT:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def faulty_events() -> list[dict[str, Any]]:
    out = []
    for base in (RICH, APP, PRICED, ITEMS, RAW_ONLY, *sample_events(2, "f")):
        for path, values in FAULTS.items():
            for value in [*values, *ANY]:
                event = with_fault(base, path, value)
                if event is not None:
                    out.append(event)
    return out


def test_one_fault_anywhere_decides_as_the_careful_path() -> None:
    """Each rule the quick path checks, broken alone, in valid events of each shape."""
    for event in faulty_events():
        assert outcome(event) == careful_outcome(event), event


def test_the_input_size_bound_leaves_big_events_to_the_careful_path() -> None:
    """An event bigger than half the size bound as JSON is the careful path's to judge (its
    budget counts up to twice the JSON size): here 80,000 raw emails, refused."""
    event = sample_events(1, "big")[0]
    event["user"]["email"] = [f"user{i}@example.com" for i in range(80_000)]
    assert quick.sent(event, True) is None
    assert outcome(event)[0] == "refused"
    assert outcome(event) == careful_outcome(event)


def test_orjson_writes_every_character_as_pydantic_does() -> None:
    """The quick path's JSON comes from orjson, the careful path's from pydantic."""
    text = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    for start in range(0, len(text), 8192):
        chunk = text[start : start + 8192]
        item = schema.Item(id=chunk, variant_dict={chunk[:50]: chunk})
        assert item.__pydantic_serializer__.to_json(item, exclude_none=True) == orjson.dumps(
            {"id": chunk, "variant_dict": {chunk[:50]: chunk}}
        )


def test_the_quick_path_knows_every_user_field() -> None:
    assert list(quick._USER_FIELDS) == list(schema.User.model_fields)


def test_a_quick_prepared_event_builds_its_model_once_and_compares_by_its_json() -> None:
    event = sample_events(1, "m")[0]
    quick_one = prepare(event)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quick, "sent", lambda raw, hash_identifiers: None)
        careful_one = prepare(event)
    assert isinstance(quick_one.data, dict) and isinstance(careful_one.data, schema.Event)
    assert quick_one == careful_one
    assert quick_one.event is quick_one.event  # built once, then kept
    assert quick_one.mask == coverage.mask(careful_one.event) == careful_one.mask
    assert quick_one.opted_out().json == careful_one.opted_out().json


@pytest.mark.parametrize("place", ["id", "user.email", "user.postal_codes", "data.contents"])
def test_a_shared_list_is_never_expanded(place: str) -> None:
    """200 references to one list of 1,000 strings of 1,000 characters: 200 MB as JSON.
    The quick path gives up at its shape or length, never counting the JSON first."""
    shared = [["y" * 1000] * 1000] * 200
    event = with_fault(sample_events(1, "s")[0], place, shared)
    assert event is not None
    tracemalloc.start()
    try:
        assert quick.sent(event, True) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
