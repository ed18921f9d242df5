"""Every contract rule, with an event that passes and one that fails."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from capi.errors import EventRejected, Problem
from capi.events import prepare, purchase, signup
from capi.hashing import sha256_hex

NOW_S = 1_795_000_000.0
NOW_MS = int(NOW_S * 1000)


def clock() -> float:
    return NOW_S


def base(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "evt-1",
        "type": "order_created",
        "timestamp_ms": NOW_MS,
        "action_source": "web",
        "source_url": "https://shop.example.com/checkout",
        "data": {"type": "contents", "amount": 12999, "currency": "USD"},
    }
    for path, value in changes.items():
        target = event
        *parents, last = path.split("__")
        for p in parents:
            target = target.setdefault(p, {})
        if value is DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return event


DELETE = object()


def refused(event: Any, *, strict: bool = False) -> str:
    with pytest.raises(EventRejected) as info:
        prepare(event, clock=clock, strict_identifiers=strict)
    return str(info.value)


# (rule, a passing change, a failing change, the path and words the refusal must name)
RULES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("id required", {"id": "x"}, {"id": DELETE}, "id: is required"),
    ("id non-empty", {"id": "a"}, {"id": ""}, "id: must not be empty"),
    ("type known", {"type": "checkout_started"}, {"type": "purchase"}, "type: must be one of"),
    (
        "timestamp integer",
        {"timestamp_ms": NOW_MS - 1},
        {"timestamp_ms": "1795000000000"},
        "timestamp_ms: must be an integer",
    ),
    (
        "timestamp not seconds",
        {"timestamp_ms": NOW_MS},
        {"timestamp_ms": 1_795_000_000},
        "looks like seconds",
    ),
    (
        "timestamp within 7 days",
        {"timestamp_ms": NOW_MS - 6 * 86_400_000},
        {"timestamp_ms": NOW_MS - 8 * 86_400_000},
        "older than 7 days",
    ),
    (
        "timestamp not 10 min ahead",
        {"timestamp_ms": NOW_MS + 9 * 60_000},
        {"timestamp_ms": NOW_MS + 11 * 60_000},
        "10 minutes in the future",
    ),
    ("data required", {}, {"data": DELETE}, "data: is required"),
    ("data.type required", {}, {"data__type": DELETE}, "data.type: is required"),
    (
        "data.type matches type",
        {"type": "page_viewed"},
        {"type": "registration_completed"},
        "data.type: must be 'customer_action'",
    ),
    (
        "amount integer minor units",
        {"data__amount": 8900},
        {"data__amount": 129.99},
        "data.amount: must be an integer in the currency's minor unit",
    ),
    (
        "amount not negative",
        {"data__amount": 0},
        {"data__amount": -5},
        "data.amount: must not be negative",
    ),
    (
        "currency ISO 4217",
        {"data__currency": "JPY"},
        {"data__currency": "ABC"},
        "data.currency: must be an ISO 4217 currency code",
    ),
    (
        "currency with amount",
        {"data__currency": "KWD"},
        {"data__currency": DELETE},
        "data.currency: is required when amount is present",
    ),
    (
        "no unknown data field",
        {"data__contents": []},
        {"data__coupon": "X"},
        "data.coupon: is not a field of contents data",
    ),
    (
        "item keys",
        {"data__contents": [{"id": "sku-1", "quantity": 2}]},
        {"data__contents": [{"id": "sku-1", "price": 2}]},
        "data.contents[0].price: is not an item field",
    ),
    (
        "item quantity integer",
        {"data__contents": [{"quantity": 1}]},
        {"data__contents": [{"quantity": 1.5}]},
        "data.contents[0].quantity: must be an integer",
    ),
    (
        "item currency with amount",
        {"data__contents": [{"amount": 1, "currency": "EUR"}]},
        {"data": {"type": "contents", "contents": [{"amount": 1}]}},
        "data.contents[0].currency: is required when amount is present and data.currency",
    ),
    (
        "item amount uses the event currency",
        {"data__contents": [{"amount": 1}]},
        {"data": {"type": "contents", "amount": 1, "contents": [{"amount": 1}]}},
        "data.currency: is required when amount is present",
    ),
    (
        "amount within 64 bits",
        {"data__amount": 2**63 - 1},
        {"data__amount": 2**63},
        "data.amount: is beyond the 64-bit integer range",
    ),
    (
        "quantity within 64 bits",
        {"data__contents": [{"quantity": 2**63 - 1}]},
        {"data__contents": [{"quantity": 2**64}]},
        "data.contents[0].quantity: is beyond the 64-bit integer range",
    ),
    ("id not blank", {"id": " a "}, {"id": "  \t "}, "id: must not be blank"),
    ("id without NUL", {"id": "a-b"}, {"id": "a\x00b"}, "id: must not contain control"),
    (
        "obref not blank",
        {"user__obref": "fb.1.x"},
        {"user__obref": "  "},
        "user.obref: must not be blank",
    ),
    (
        "postal code characters",
        {"user__postal_codes": ["SW1A 1AA", "94107-1234"]},
        {"user__postal_codes": ["SW1A_1AA"]},
        "user.postal_codes[0]: must be 1-32 letters, digits, spaces or hyphens",
    ),
    (
        "postal code length",
        {"user__postal_codes": ["1" * 32]},
        {"user__postal_codes": ["1" * 33]},
        "user.postal_codes[0]: must be 1-32",
    ),
    (
        "region length",
        {"user__regions": ["r" * 128]},
        {"user__regions": ["r" * 129]},
        "user.regions[0]: must be at most 128 characters",
    ),
    (
        "city length",
        {"user__cities": ["c" * 128]},
        {"user__cities": ["c" * 129]},
        "user.cities[0]: must be at most 128 characters",
    ),
    (
        "android advertising id is a UUID",
        {"user__android_advertising_id": "38400000-8cf0-11bd-b23e-10b96e40000d"},
        {"user__android_advertising_id": "38400000-8cf0-11bd-b23e"},
        "user.android_advertising_id: must be a Google advertising id in UUID form",
    ),
    (
        "android advertising id is not all zeros (limited ad tracking: the API ignores it)",
        {"user__android_advertising_id": "00000000-0000-0000-0000-000000000001"},
        {"user__android_advertising_id": "00000000-0000-0000-0000-000000000000"},
        "user.android_advertising_id: is all zeros",
    ),
    (
        "email given as a name",
        {"user__first_name": "Ada"},
        {"user__first_name": "ada@example.com"},
        "user.first_name[0]: looks like an email address",
    ),
    (
        "email given as a phone",
        {"user__phone": "+1 415 555 2671"},
        {"user__phone": "ada@example.com"},
        "user.phone[0]: must be a phone number",
    ),
    (
        "item content_type non-empty",
        {"data__contents": [{"content_type": "product"}]},
        {"data__contents": [{"content_type": ""}]},
        "data.contents[0].content_type: must not be empty",
    ),
    (
        "variant_dict strings",
        {"data__contents": [{"variant_dict": {"size": "M"}}]},
        {"data__contents": [{"variant_dict": {"size": 3}}]},
        "data.contents[0].variant_dict.size",
    ),
    (
        "source_url for web",
        {"source_url": "https://a.example/"},
        {"source_url": DELETE},
        "source_url: is required when action_source is 'web'",
    ),
    (
        "source_url absolute http(s)",
        {"source_url": "http://a.example/x"},
        {"source_url": "/checkout"},
        "source_url: must be an absolute http(s) URL",
    ),
    (
        "action_source known",
        {"action_source": "phone_call"},
        {"action_source": "fax"},
        "action_source: must be one of",
    ),
    ("opt_out boolean", {"opt_out": True}, {"opt_out": "yes"}, "opt_out: must be true or false"),
    (
        "no unknown event field",
        {"oppref": "abc"},
        {"timestamp": NOW_MS},
        "timestamp: is not an event field",
    ),
    (
        "countries alpha-2",
        {"user__countries": ["us"]},
        {"user__countries": ["USA"]},
        "user.countries[0]: must be an ISO 3166-1 alpha-2",
    ),
    (
        "hashed lists are 64-hex",
        {"user__emails_sha256": ["a" * 64]},
        {"user__emails_sha256": ["abc"]},
        "user.emails_sha256[0]: must be a SHA-256 hex digest",
    ),
    (
        "plural schema",
        {"user__emails_sha256": ["b" * 64]},
        {"user__email_sha256": "b" * 64},
        "user.email_sha256: is not a field; use user.emails_sha256",
    ),
    (
        "ip address",
        {"user__ip_address": "2001:db8::1"},
        {"user__ip_address": "999.1.1.1"},
        "user.ip_address: must be an IPv4 or IPv6 address",
    ),
    (
        "raw email valid",
        {"user__email": "a@example.com"},
        {"user__email": "nope"},
        "user.email[0]: must be an email address",
    ),
]


@pytest.mark.parametrize(("rule", "ok", "bad", "message"), RULES, ids=[r[0] for r in RULES])
def test_rule(rule: str, ok: dict[str, Any], bad: dict[str, Any], message: str) -> None:
    prepare(base(**ok), clock=clock)
    if message.startswith("user.") and "is not a field" not in message:
        # An optional identifier: left out with a warning, or refused in strict mode.
        kept = prepare(base(**bad), clock=clock)
        assert [message in str(w) for w in kept.warnings] == [True], kept.warnings
        assert b'"user"' not in kept.json or b'"user":{}' in kept.json
        assert message in refused(base(**bad), strict=True)
    else:
        assert message in refused(base(**bad))


def test_customer_action_has_no_contents() -> None:
    event = signup("s-1", email="a@example.com", source_url="https://a.example/", clock=clock)
    prepare(event, clock=clock)
    event["data"]["contents"] = []
    assert "data.contents: is not a field of customer_action data" in refused(event)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("newsletter_signup", True),
        ("a", True),
        ("Demo-Booked2", True),
        ("-bad", False),
        ("bad_", False),
        ("has space", False),
        ("x" * 65, False),
        ("newsletter\n", False),
        ("order_created", False),
    ],
)
def test_custom_event_names(name: str, ok: bool) -> None:
    event = base(
        type="custom", custom_event_name=name, data={"type": "custom", "any": [1, {"x": None}]}
    )
    if ok:
        assert prepare(event, clock=clock).name == name.lower()
    else:
        assert "custom_event_name" in refused(event)


def test_custom_event_requires_a_name_and_only_custom_has_one() -> None:
    assert "custom_event_name: is required" in refused(base(type="custom", data={"type": "custom"}))
    assert "only allowed when type is 'custom'" in refused(base(custom_event_name="x"))


def test_app_events_must_be_mobile_app() -> None:
    ok = base(type="app_installed", action_source="mobile_app", data={"type": "customer_action"})
    prepare(ok, clock=clock)
    bad = base(type="app_opened", action_source="web", data={"type": "customer_action"})
    assert "action_source: must be 'mobile_app'" in refused(bad)


def test_every_documented_type_validates() -> None:
    from capi.schema import DATA_TYPE_OF

    for event_type, data_type in DATA_TYPE_OF.items():
        event = base(type=event_type, data={"type": data_type})
        if event_type == "custom":
            event["custom_event_name"] = "my_event"
        if event_type.startswith("app_"):
            event["action_source"] = "mobile_app"
        assert prepare(event, clock=clock).event.type == event_type


def test_raw_identifiers_become_hashed_lists_and_never_reach_the_json() -> None:
    event = signup(
        "s-2",
        email=[" Ada@Example.COM ", "ada@example.com"],
        phone="+1 (415) 555-2671",
        first_name="Ada",
        last_name="O'Neill",
        external_id="  CUST-00042  ",
        source_url="https://a.example/signup?email=ada@example.com#x",
        clock=clock,
    )
    prepared = prepare(event, clock=clock)
    body = orjson.loads(prepared.json)
    assert body["user"] == {
        "emails_sha256": [sha256_hex("ada@example.com")],  # deduplicated
        "phone_numbers_sha256": [sha256_hex("14155552671")],
        "external_ids_sha256": [sha256_hex("CUST-00042")],
        "first_names_sha256": [sha256_hex("ada")],
        "last_names_sha256": [sha256_hex("oneill")],
    }
    assert body["source_url"] == "https://a.example/signup"  # query and fragment are PII
    raw = prepared.json.decode().lower()
    for secret in ("ada@example.com", "4155552671", "cust-00042", "neill"):
        assert secret not in raw


def test_purchase_helper_builds_an_order() -> None:
    event = purchase(
        "o-1",
        amount=12999,
        currency="usd",
        contents=[{"id": "sku-1", "quantity": 1, "amount": 12999, "currency": "USD"}],
        email="buyer@example.com",
        source_url="https://shop.example.com/thanks",
        clock=clock,
    )
    body = orjson.loads(prepare(event, clock=clock).json)
    assert body["type"] == "order_created"
    assert body["data"]["currency"] == "USD"
    assert body["timestamp_ms"] == NOW_MS


def test_all_problems_are_reported_at_once_without_echoing_pii() -> None:
    event = base(id="", data__amount=1.5, user__email="not an email ada@example.com")
    message = refused(event)
    assert "id: must not be empty" in message
    assert "data.amount" in message
    assert "ada@example.com" not in message


def test_past_twenty_problems_the_rest_are_counted_right() -> None:
    """Twenty problems are named, then how many more there are: capped twice, the count
    said "and 1 more problems" for an event with 60 unknown keys (43 more)."""
    event = {"id": "many-1", **{f"extra{i}": 0 for i in range(60)}}
    with pytest.raises(EventRejected) as caught:
        prepare(event)
    problems = caught.value.problems
    assert len(problems) == 21, problems
    # 60 unknown keys, and type, timestamp_ms and data are missing: 63 problems in all.
    assert problems[20] == Problem("(event)", "and 43 more problems")


def test_a_schema_problem_does_not_hide_the_time_window_and_the_source_url() -> None:
    """A misspelt action_source and an unknown currency were named, but the timestamp in
    seconds and the relative source_url beside them only once those were fixed: the rules
    checked after validation never ran (a newcomer fixed and resent twice)."""
    event = base(
        action_source="webb",
        data__currency="XYZ",
        timestamp_ms=NOW_MS // 1000,
        source_url="shop.example.com/thanks",
    )
    message = refused(event)
    assert "action_source: must be one of" in message, message
    assert "data.currency" in message, message
    assert "timestamp_ms: must be Unix time in milliseconds" in message, message
    assert "source_url: must be an absolute http(s) URL" in message, message
    old = refused(base(id="", timestamp_ms=NOW_MS - 8 * 86_400_000))
    assert "id: must not be empty" in old and "timestamp_ms: is older than 7 days" in old, old


@pytest.mark.parametrize("url", ["http://[abc/thanks", "https://[::1/x", "http://]x/"])
def test_a_source_url_that_urllib_cannot_split_is_refused_naming_it(url: str) -> None:
    """urlsplit() raises ValueError ("Invalid IPv6 URL") on an unbalanced bracket in the
    host: prepare() raised it, outside capi's error tree (producers refused the event as
    "could not be read as an event (ValueError)", naming no field), alone or beside a
    schema problem."""
    assert "source_url: must be an absolute http(s) URL" in refused(base(source_url=url))
    message = refused(base(source_url=url, action_source="webb"))
    assert "action_source: must be one of" in message, message
    assert "source_url: must be an absolute http(s) URL" in message, message


def test_non_object_is_refused() -> None:
    assert "must be a JSON object" in refused(["not", "an", "event"])


def test_prepare_does_not_mutate_input() -> None:
    event = signup("s-3", email="a@example.com", source_url="https://a.example/", clock=clock)
    before = copy.deepcopy(event)
    prepare(event, clock=clock)
    assert event == before


def test_the_intakes_envelope_given_as_an_event_is_named_as_such() -> None:
    """`capi enqueue` given the HTTP intake's body said only "events: is not an event
    field"; it says what the envelope is and what to give instead."""
    problems = refused({"events": [base()]})
    assert (
        'events: is not an event field: {"events": [...]} is the body of the HTTP intake'
        in problems
    )
    assert "one JSON object per line" in problems


def test_an_all_zero_gaid_refused_in_strict_mode_is_not_said_to_be_left_out() -> None:
    """Under strict_identifiers the event is refused: "so it is left out" was false there
    (and the producer's warning read "left out: ... so it is left out")."""
    zeros = {"user__android_advertising_id": "00000000-0000-0000-0000-000000000000"}
    message = refused(base(**zeros), strict=True)
    assert "user.android_advertising_id: is all zeros" in message
    assert "left out" not in message, message
