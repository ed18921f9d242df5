"""Conversions that count: click ids lifted from URLs, bad identifiers left out (not the
event), amounts from decimal values, and consent; over a real Redis, the sandbox over HTTP,
the CLI and the HTTP intake."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from capi import coverage
from capi.errors import EventRejected
from capi.events import now_ms, prepare, purchase, signup
from capi.hashing import sha256_hex
from capi.producer import SyncProducer
from capi.sandbox import Fault, SandboxThread
from tests.helpers import capi, drain, enqueue, http_get, make_settings, redis_dump
from tests.intake_helpers import start_intake

GOOD = "ada@example.com"


def sent(sandbox: SandboxThread) -> dict[str, dict[str, Any]]:
    """The events the sandbox accepted, by id."""
    return {e["id"]: e for e in sandbox.state.recent_events()}


# -- 1. click ids from URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "oppref"),
    [
        ("?oppref=abc123", "abc123"),
        ("?utm_source=x&oppref=abc%2F12+3&oppref=second", "abc/12 3"),  # first, decoded
        ("?opp%72ef=enc", "enc"),  # the name is decoded too, as URLSearchParams does
        ("?oppref=%E2%9C%93%ZZ", "✓%ZZ"),  # a bad escape stays as it is
        ("?oppref=", None),  # empty: nothing to lift
        ("?xoppref=1#oppref=frag", None),  # another name; the fragment is not the query
    ],
)
def test_oppref_is_lifted_from_the_source_url_query(query: str, oppref: str | None) -> None:
    event = prepare(
        purchase("p", amount=1, currency="USD", source_url="https://s.example/t" + query)
    )
    assert event.event.oppref == oppref
    assert event.event.source_url == "https://s.example/t"


@pytest.mark.parametrize(
    ("given", "sent_as"),
    [
        (" https://s.example/t \n", "https://s.example/t"),  # pasted with its whitespace
        ("https://s.example/t ?oppref=x", "https://s.example/t%20"),  # a browser sends this
        ("https://s.example/my page", "https://s.example/my%20page"),
        ('https://s.example/caf\u00e9/"q"', "https://s.example/caf%C3%A9/%22q%22"),
        ("https://s.example/a%20b;v=1/~x", "https://s.example/a%20b;v=1/~x"),  # already valid
    ],
)
def test_the_source_url_sent_is_a_valid_absolute_url(given: str, sent_as: str) -> None:
    # The contract wants an absolute http(s) URL, and one event the API refuses fails its
    # whole batch: a space or a non-ASCII letter is percent-encoded, as browsers send it.
    event = prepare(purchase("p", amount=1, currency="USD", source_url=given))
    assert event.event.source_url == sent_as


def test_a_source_url_with_spaces_reaches_the_api_trimmed_and_encoded(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    raw = {
        "id": "o-url",
        "type": "order_created",
        "timestamp_ms": now_ms(),
        "action_source": "web",
        "source_url": "  https://shop.example/thank you?oppref=c1 ",
        "data": {"type": "contents", "amount": 100, "currency": "USD"},
    }
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(raw)
    drain(settings)
    got = sent(sandbox)["o-url"]
    assert got["source_url"] == "https://shop.example/thank%20you"
    assert got["oppref"] == "c1"


def test_an_explicit_oppref_wins_over_the_url() -> None:
    url = "https://s.example/t?oppref=from-url"
    event = prepare(purchase("p", amount=1, currency="USD", source_url=url, oppref="given"))
    assert event.event.oppref == "given"


def test_a_purchase_from_a_tracked_url_is_delivered_with_its_oppref(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    url = "https://shop.example/thanks?order=9&oppref=abc123#top"
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(purchase("o-1", amount=12999, currency="USD", source_url=url))
    drain(settings)
    got = sent(sandbox)["o-1"]
    assert got["oppref"] == "abc123"
    assert got["source_url"] == "https://shop.example/thanks"


def test_an_empty_oppref_is_left_out_with_a_warning_and_the_purchase_delivered(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # A backend reading the __oppref cookie with a default of "" (no click) must not lose
    # the purchase: the oppref is an optional identifier, dropped and named like the others;
    # the click id of the landing URL's query is used instead when there is one.
    settings = make_settings(sandbox, redis_url)
    no_click = purchase("o-5", amount=500, currency="USD", source_url="https://s.example/t")
    from_url = purchase(
        "o-6", amount=500, currency="USD", source_url="https://s.example/t?oppref=click-6"
    )
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([no_click | {"oppref": ""}, from_url | {"oppref": 7}])
    assert report.queued == 2, report
    assert [(w.path, w.rule) for w in report.warnings[0]] == [("oppref", "must not be empty")]
    assert [w.path for w in report.warnings[1]] == ["oppref"]
    drain(settings)
    got = sent(sandbox)
    assert "oppref" not in got["o-5"]
    assert got["o-6"]["oppref"] == "click-6"
    strict = make_settings(sandbox, redis_url, strict_identifiers=True)
    with SyncProducer.from_settings(strict) as producer, pytest.raises(EventRejected) as info:
        producer.enqueue(no_click | {"id": "o-7", "oppref": ""})
    assert "oppref: must not be empty" in str(info.value)


# -- 2. identifiers never cost a conversion ------------------------------------------------


def test_a_bad_phone_beside_a_good_email_is_left_out_and_the_purchase_delivered(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    evt = purchase(
        "o-2",
        amount=500,
        currency="USD",
        email=GOOD,
        phone="1234567",
        source_url="https://shop.example/thanks",
    )
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([evt])
    assert report.queued == 1
    assert [(w.path, w.rule) for w in report.warnings[0]] == [
        ("user.phone[0]", "must have 8 to 15 digits including the country code, got 7")
    ]
    drain(settings)
    assert sent(sandbox)["o-2"]["user"] == {"emails_sha256": [sha256_hex(GOOD)]}


def test_a_raw_email_beside_a_hash_given_as_a_string_is_kept(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # emails_sha256 given as one string, not a list: that value is left out with a warning;
    # the raw email beside it is a good identifier and is sent, never silently lost.
    settings = make_settings(sandbox, redis_url)
    hashed = sha256_hex("other@example.com")
    evt = signup("s-9", source_url="https://s.example/", user={"emails_sha256": hashed})
    evt["user"]["email"] = GOOD
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([evt])
    assert report.queued == 1, report
    assert [w.path for w in report.warnings[0]] == ["user.emails_sha256"]
    drain(settings)
    assert sent(sandbox)["s-9"]["user"] == {"emails_sha256": [sha256_hex(GOOD)]}


def test_a_phone_written_with_no_break_spaces_is_hashed_as_its_digits(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # Number formatting (French style, spreadsheets, Intl) puts no-break spaces between the
    # digit groups; they are spaces, dropped like " ", not a reason to lose the phone.
    settings = make_settings(sandbox, redis_url)
    phones = ["+33\u00a06\u00a012\u00a034\u00a056\u00a078", "+33\u202f6 12 34 56 79"]
    evt = purchase("o-8", amount=5, currency="EUR", phone=phones, source_url="https://s.e/")
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([evt])
    assert report.queued == 1 and not report.warnings, report
    drain(settings)
    assert sent(sandbox)["o-8"]["user"] == {
        "phone_numbers_sha256": [sha256_hex("33612345678"), sha256_hex("33612345679")]
    }


def test_an_ipv4_client_seen_through_a_dual_stack_socket_is_sent_as_ipv4(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # A server listening on an IPv6 socket sees IPv4 clients as ::ffff:a.b.c.d. The API takes
    # the raw address (the Pixel sees a.b.c.d): capi sent it rewritten as ::ffff:cb00:7105.
    from capi.web import event_fields

    settings = make_settings(sandbox, redis_url)
    scope = {
        "type": "http",
        "scheme": "https",
        "path": "/thanks",
        "query_string": b"",
        "headers": [(b"host", b"shop.example"), (b"user-agent", b"UA")],
        "client": ("::ffff:203.0.113.5", 50000),
    }
    evt = purchase("o-9", amount=5, currency="USD", **event_fields(scope))
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(evt)
    drain(settings)
    assert sent(sandbox)["o-9"]["user"] == {"ip_address": "203.0.113.5", "user_agent": "UA"}


def test_strict_identifiers_refuse_as_before(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, strict_identifiers=True)
    evt = purchase(
        "o-3",
        amount=500,
        currency="USD",
        email=GOOD,
        phone="1234567",
        source_url="https://shop.example/thanks",
    )
    with SyncProducer.from_settings(settings) as producer, pytest.raises(EventRejected) as info:
        producer.enqueue(evt)
    assert "user.phone[0]: must have 8 to 15 digits" in str(info.value)


def test_five_emails_become_three_hashes_and_lists_keep_three_valid_unique_values() -> None:
    emails = [
        "a@x.example",
        "not an email",
        " A@X.example ",
        "b@x.example",
        "c@x.example",
        "d@x.example",
    ]
    event = prepare(
        signup(
            "s",
            email=emails,
            source_url="https://s.example/",
            user={"countries": ["UK", "us", "US", "fr", "de", "it"]},
        )
    )
    user = orjson.loads(event.json)["user"]
    assert user["emails_sha256"] == [
        sha256_hex(e) for e in ("a@x.example", "b@x.example", "c@x.example")
    ]
    assert user["countries"] == ["US", "FR", "DE"]
    assert {w.path for w in event.warnings} == {"user.email[1]", "user.countries[0]"}


def test_required_fields_still_refuse_and_name_no_dropped_identifier() -> None:
    evt = purchase("o-4", amount=5, currency="USD", phone="123")
    evt["action_source"] = "web"  # and no source_url
    with pytest.raises(EventRejected) as info:
        prepare(evt)
    assert [p.path for p in info.value.problems] == ["source_url"]


def test_the_cli_reports_warnings_in_text_and_json(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    line = orjson.dumps(
        purchase(
            "o-5", amount=1, currency="USD", email=GOOD, phone="12", source_url="https://s.example/"
        )
    ).decode()
    text = capi(settings, "enqueue", input=line + "\n")
    assert text.returncode == 0, text.stderr
    assert "line 1: warning: user.phone[0]: left out: must have 8 to 15 digits" in text.stderr
    assert "warned 1" in text.stdout
    as_json = capi(settings, "enqueue", "--json", input=line.replace("o-5", "o-6") + "\n")
    summary = json.loads(as_json.stdout)
    assert summary["warned"] == 1 and summary["skipped"] == 0 and summary["queued"] == 1
    dry = capi(settings, "enqueue", "--dry-run", "--json", input=line + "\n")
    assert json.loads(dry.stdout)["warned"] == 1 and "line 1: warning: user.phone[0]" in dry.stderr


def test_the_intake_reports_warnings_per_event_and_counts_them(
    tmp_path: Path, redis_url: str
) -> None:
    intake = start_intake(tmp_path, redis_url)
    try:
        evt = purchase(
            "o-7", amount=1, currency="USD", email=GOOD, phone="12", source_url="https://s.example/"
        )
        answer = intake.post([evt]).json()
        (result,) = answer["results"]
        assert result["status"] == "queued"
        assert result["warnings"] == [
            {
                "field": "user.phone[0]",
                "rule": "must have 8 to 15 digits including the country code, got 2",
            }
        ]
        _, metrics = http_get(intake.url + "/metrics")
        assert 'capi_identifiers_dropped_total{destination="default",field="user.phone"} 1.0' in (
            metrics
        )
    finally:
        intake.stop()


# -- 5. amounts as people write them ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "currency", "amount"),
    [
        ("129.99", "USD", 12999),
        (Decimal("129.99"), "usd", 12999),
        ("8900", "JPY", 8900),
        ("8900.00", "JPY", 8900),
        ("1.5", "KWD", 1500),
        ("0.10", "EUR", 10),
        (3, "USD", 300),
    ],
)
def test_a_decimal_value_becomes_the_amount_in_minor_units(
    value: Any, currency: str, amount: int
) -> None:
    evt = purchase("p", amount=0, currency=currency, source_url="https://s.example/")
    del evt["data"]["amount"]
    evt["data"]["value"] = value
    evt["data"]["contents"] = [{"id": "sku", "value": value}]
    data = orjson.loads(prepare(evt).json)["data"]
    assert data["amount"] == amount and data["contents"][0]["amount"] == amount
    assert "value" not in data and "value" not in data["contents"][0]


@pytest.mark.parametrize(
    ("value", "currency", "rule"),
    [
        ("1.005", "USD", "has more decimal places than USD has (2); capi never rounds"),
        ("1.5", "JPY", "has more decimal places than JPY has (0)"),
        (1.5, "USD", 'must be a decimal string such as "129.99", not a number with a fraction'),
        ("12,99", "EUR", "must be a decimal number"),
        ("-1", "USD", "must not be negative"),
        ("1", "XAU", "XAU has no minor unit in ISO 4217; give amount instead"),
    ],
)
def test_a_value_that_is_not_an_exact_amount_is_refused(
    value: Any, currency: str, rule: str
) -> None:
    evt = purchase("p", amount=0, currency=currency, source_url="https://s.example/")
    del evt["data"]["amount"]
    evt["data"]["value"] = value
    with pytest.raises(EventRejected) as info:
        prepare(evt)
    assert f"data.value: {rule}" in str(info.value)


def test_a_value_beside_an_amount_is_refused() -> None:
    evt = purchase("p", amount=5, currency="USD", source_url="https://s.example/")
    evt["data"]["value"] = "0.05"
    with pytest.raises(EventRejected, match=r"data\.value: give value or amount, not both"):
        prepare(evt)


def test_a_value_of_129_99_usd_is_delivered_as_12999(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    evt = purchase("o-8", amount=0, currency="USD", source_url="https://s.example/")
    evt["data"] = {"type": "contents", "value": "129.99", "currency": "USD"}
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(evt)
    drain(settings)
    assert sent(sandbox)["o-8"]["data"]["amount"] == 12999


# -- 3. consent ------------------------------------------------------------------------------


def consent_event(event_id: str, consent: str | None, who: str = "secret") -> dict[str, Any]:
    evt = purchase(
        event_id,
        amount=100,
        currency="USD",
        email=f"{who}.person@example.com",
        phone="+1 415 555 2671" if who == "secret" else "+44 20 7946 0958",
        source_url="https://s.example/",
        user={"obref": f"ob.1.{who}", "ip_address": "203.0.113.9" if who == "secret" else "::1"},
    )
    if consent is not None:
        evt["consent"] = consent
    return evt


def test_a_denied_event_under_drop_is_never_sent_and_leaves_no_identifier_in_redis(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(
            [consent_event("c-1", "denied"), consent_event("c-2", "granted", who="open")]
        )
        assert producer.enqueue(consent_event("c-3", "denied")) is False
    assert report.status(0) == "skipped" and report.status(1) == "queued"
    assert [p.path for p in report.skipped[0]] == ["consent"]
    dump = redis_dump(redis_url)  # before and after delivery: never there
    drain(settings)
    assert set(sent(sandbox)) == {"c-2"}
    assert "consent" not in sent(sandbox)["c-2"]  # capi's, never sent to the API
    client = redis.Redis.from_url(redis_url)
    assert int(client.hget(settings.keys.stats, "skipped") or 0) == 2
    client.close()
    assert sha256_hex("open.person@example.com").encode() in dump  # the scan sees identifiers
    for blob in (dump, redis_dump(redis_url)):
        for needle in (
            b"203.0.113.9",
            b"ob.1.secret",
            sha256_hex("secret.person@example.com").encode(),
            sha256_hex("14155552671").encode(),
            b"secret.person",
        ):
            assert needle not in blob, needle
    # The live-outcomes ring notes skipped events (bulk and single): id and name, no kinds.
    ring = [json.loads(line) for line in capi(settings, "tail", "--json").stdout.splitlines()]
    skipped = {r["id"]: r for r in ring if r["status"] == "skipped"}
    assert set(skipped) == {"c-1", "c-3"}
    assert all(r["identifiers"] == [] for r in skipped.values())


def test_a_denied_event_under_opt_out_is_sent_opted_out_without_obref(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, consent_policy="opt_out", consent_default="denied")
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(
            [consent_event("c-4", None), consent_event("c-5", "granted")]
        )
    assert report.queued == 2
    drain(settings)
    got = sent(sandbox)
    assert got["c-4"]["opt_out"] is True and "obref" not in got["c-4"]["user"]
    assert got["c-4"]["user"]["ip_address"] == "203.0.113.9"
    assert "opt_out" not in got["c-5"] and got["c-5"]["user"]["obref"] == "ob.1.secret"


def test_consent_is_per_destination_in_the_destinations_file(
    tmp_path: Path, redis_url: str, sandbox: SandboxThread
) -> None:
    file = tmp_path / "destinations.toml"
    file.write_text(
        '[destinations.strict]\npixel_id = "p1"\napi_key_env = "K1"\n'
        '[destinations.lenient]\npixel_id = "p2"\napi_key_env = "K2"\nconsent_policy = "opt_out"\n'
    )
    settings = make_settings(sandbox, redis_url, destinations_file=file)
    with SyncProducer.from_settings(settings) as producer:
        answer = producer.enqueue(consent_event("c-6", "denied"), ["strict", "lenient"])
        report = producer.enqueue_many([consent_event("c-7", "denied")], ["strict", "lenient"])
    assert answer == {"strict": False, "lenient": True}
    assert report.status(0) == "queued" and report.skipped[0][0].path == "consent"
    client = redis.Redis.from_url(redis_url)
    strict = settings.keys.for_destination("strict")
    lenient = settings.keys.for_destination("lenient")
    assert client.xlen(strict.stream) == 0 and client.xlen(lenient.stream) == 2
    assert int(client.hget(strict.stats, "skipped") or 0) == 2
    client.close()


def test_a_consent_that_is_neither_value_is_refused() -> None:
    with pytest.raises(EventRejected, match=r"consent: must be 'granted' or 'denied'"):
        prepare(consent_event("c-8", "yes"))


def test_skipped_is_answered_by_the_intake_and_counted_by_the_cli(
    tmp_path: Path, redis_url: str, sandbox: SandboxThread
) -> None:
    intake = start_intake(tmp_path, redis_url)
    try:
        answer = intake.post([consent_event("c-9", "denied"), consent_event("c-10", None)]).json()
    finally:
        intake.stop()
    assert [r["status"] for r in answer["results"]] == ["skipped", "queued"]
    assert answer["results"][0]["errors"][0]["field"] == "consent"
    assert answer["skipped"] == 1
    settings = make_settings(sandbox, redis_url)
    line = orjson.dumps({**consent_event("c-11", "denied"), "timestamp_ms": now_ms()}).decode()
    done = capi(settings, "enqueue", "--json", input=line + "\n")
    assert json.loads(done.stdout)["skipped"] == 1, done.stderr
    assert "line 1: skipped: consent denied" in done.stderr


# -- 6. match coverage -------------------------------------------------------------------------


def test_kinds_are_told_from_fields_never_from_values_or_custom_data() -> None:
    evt = {
        **purchase("k", amount=1, currency="USD", source_url="https://s.example/"),
        "type": "custom",
        "custom_event_name": "quiz",
        "data": {"type": "custom", "emails_sha256": ["x"], "note": '"oppref":"x"'},
        "user": {"user_agent": 'Mozilla "obref": "phone_numbers_sha256":', "cities": ["Oslo"]},
    }
    weak = prepare(evt)
    assert coverage.kinds(coverage.mask(weak.event)) == ("geo",)
    assert coverage.mask_of_json(weak.json) == coverage.mask(weak.event)
    full = prepare(
        purchase(
            "f",
            amount=1,
            currency="USD",
            source_url="https://s.example/?oppref=o",
            email=GOOD,
            phone="+14155552671",
            external_id="c-1",
            user={
                "first_name": "Ada",
                "obref": "ob",
                "ip_address": "203.0.113.9",
                "user_agent": "UA",
                "postal_codes": ["0150"],
                "android_advertising_id": "38400000-8cf0-11bd-b23e-10b96e40000d",
            },
        )
    )
    assert coverage.kinds(coverage.mask(full.event)) == coverage.KINDS
    assert coverage.mask_of_json(full.json) == coverage.mask(full.event)
    opted_out = full.opted_out()
    assert "obref" not in coverage.kinds(coverage.mask(opted_out.event))
    assert coverage.mask_of_json(opted_out.json) == coverage.mask(opted_out.event)


def test_match_coverage_of_delivered_events_is_listed_and_a_weak_mix_warned(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    strong = [
        purchase(
            f"m-{i}",
            amount=1,
            currency="USD",
            email=f"u{i}@example.com",
            source_url="https://s.example/?oppref=c" if i % 2 else "https://s.example/",
        )
        for i in range(10)
    ]
    weak = [
        purchase(
            f"w-{i}",
            amount=1,
            currency="USD",
            source_url="https://s.example/",
            user={"ip_address": "203.0.113.9", "user_agent": "UA"},
        )
        for i in range(30)
    ]
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue_many([*strong, *weak]).queued == 40
    drain(settings)
    assert len(sandbox.state.delivered_ids()) == 40
    listed = json.loads(capi(settings, "destinations", "--json").stdout)
    assert listed["match_coverage_events"] == 40
    assert listed["match_coverage"] == {
        "email": 0.25,
        "phone": 0.0,
        "external_id": 0.0,
        "name": 0.0,
        "oppref": 0.125,
        "obref": 0.0,
        "ip_user_agent": 0.75,
        "aaid": 0.0,
        "geo": 0.0,
    }
    status = capi(settings, "status")
    assert (
        "match coverage: 75% of the 40 events delivered in the last 24 h carried no "
        "email, phone, external id or oppref"
    ) in status.stdout, status.stdout
    drain(settings)  # nothing left: a second drain counts nothing twice
    again = json.loads(capi(settings, "destinations", "--json").stdout)
    assert again["match_coverage_events"] == 40


def test_coverage_survives_a_retry_and_an_entry_without_kinds(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    sandbox.state.faults.append(Fault("server_error", every=1, remaining=1, status=503))
    evts = [
        purchase(
            f"r-{i}",
            amount=1,
            currency="USD",
            phone="+14155552671",
            source_url="https://s.example/",
        )
        for i in range(4)
    ]
    enqueue(settings, evts)
    client = redis.Redis.from_url(redis_url)
    (sid, fields), *_ = client.xrange(settings.keys.stream)
    del fields[b"k"]  # as queued by an older capi, or a replayed dead letter
    client.xadd(settings.keys.stream, fields)
    client.xdel(settings.keys.stream, sid)
    client.close()
    drain(settings)
    assert sandbox.state.summary()["statuses"]["503"] == 1  # the batch was retried
    listed = json.loads(capi(settings, "destinations", "--json").stdout)
    assert listed["match_coverage_events"] == 4
    assert listed["match_coverage"]["phone"] == 1.0
