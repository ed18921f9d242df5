"""capi against the contract, over real HTTP (the sandbox) and a real Redis.

The sandbox judges events with its own reading of the contract (capi.sandbox.contract), so
the agreement table below can catch a misreading in capi's validation: for each of the
contract's cases, a strict producer (CAPI_STRICT_IDENTIFIERS=true) queues the event exactly
when the sandbox accepts it; by default, an event the API refuses only over an optional
identifier is queued without it, and what is queued is accepted.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from typing import Any

import orjson
import pytest
import redis

from capi.client import ConversionsClient
from capi.errors import EventRejected, InvalidEventError
from capi.events import now_ms
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread, contract, state
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from tests.helpers import dead_letters, doom, drain, enqueue, events, ids, make_settings

H = "ab" * 32  # a SHA-256 hex digest
DAY_MS = 86_400_000


def event(**changes: Any) -> dict[str, Any]:
    """A purchase in the API's format (hashed identifiers), changed as asked."""
    base: dict[str, Any] = {
        "id": "evt-1",
        "type": "order_created",
        "timestamp_ms": now_ms(),
        "action_source": "web",
        "source_url": "https://shop.example/thanks",
        "user": {"emails_sha256": [H]},
        "data": {"type": "contents", "amount": 12999, "currency": "USD"},
    }
    for path, value in changes.items():
        target = base
        *parents, last = path.split("__")
        for p in parents:
            target = target.setdefault(p, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return base


def custom(**data: Any) -> dict[str, Any]:
    return event(type="custom", custom_event_name="quiz_done", data={"type": "custom", **data})


def action(kind: str, **changes: Any) -> dict[str, Any]:
    return event(**{"type": kind, "data": {"type": "customer_action"}, **changes})


ITEM = {"id": "sku-1", "quantity": 2}
# When the cases were built (at collection): each test moves its event's timestamp on to its
# own now, so "11 minutes ahead" is still ahead however long the run took to get there.
BUILT_MS = now_ms()
# (case, event, accepted?): the contract's cases, sections 3-5.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("purchase", event(), True),
    ("item amount, event currency", event(data__contents=[{**ITEM, "amount": 500}]), True),
    ("item amount, own currency", event(data__contents=[{"amount": 5, "currency": "EUR"}]), True),
    (
        "item amount, no currency at all",
        event(data={"type": "contents", "contents": [{"amount": 5}]}),
        False,
    ),
    ("event amount without currency", event(data__currency=None), False),
    ("lowercase currency", event(data__currency="jpy"), True),
    ("unknown currency", event(data__currency="ABC"), False),
    ("negative amount", event(data__amount=-1), False),
    ("amount beyond 64 bits", event(data__amount=2**63), False),
    ("amount as a decimal", event(data__amount=129.99), False),
    ("quantity as a decimal", event(data__contents=[{"quantity": 1.5}]), False),
    ("unknown data field", event(data__coupon="X"), False),
    ("unknown item field", event(data__contents=[{"price": 1}]), False),
    ("empty content_type", event(data__contents=[{"content_type": ""}]), False),
    ("variant_dict of strings", event(data__contents=[{"variant_dict": {"s": "M"}}]), True),
    ("variant_dict of numbers", event(data__contents=[{"variant_dict": {"s": 3}}]), False),
    ("signup", action("registration_completed"), True),
    (
        "signup with contents",
        action("registration_completed", data={"type": "customer_action", "contents": []}),
        False,
    ),
    ("data type mismatch", event(type="lead_created"), False),
    ("no data type", event(data={"amount": 1, "currency": "USD"}), False),
    ("app event from mobile", action("app_installed", action_source="mobile_app"), True),
    ("app event from web", action("app_opened"), False),
    ("plan", event(type="trial_started", data={"type": "plan_enrollment", "plan_id": "p"}), True),
    ("custom with extras", custom(anything=[1, {"x": None}]), True),
    ("custom name standard", custom() | {"custom_event_name": "Order_Created"}, False),
    ("custom name trailing _", custom() | {"custom_event_name": "quiz_"}, False),
    ("custom name missing", custom() | {"custom_event_name": None}, False),
    ("custom name on standard", event(custom_event_name="x"), False),
    ("web without source_url", event(source_url=None), False),
    ("relative source_url", event(source_url="/thanks"), False),
    ("source_url with query", event(source_url="https://a.example/?utm=1"), True),
    ("offline without source_url", event(source_url=None, action_source="offline"), True),
    ("unknown action_source", event(action_source="fax"), False),
    ("opt_out boolean", event(opt_out=True), True),
    ("opt_out text", event(opt_out="yes"), False),
    ("unknown event field", event(timestamp=1), False),
    ("id missing", event(id=None), False),
    ("id empty", event(id=""), False),
    ("unknown type", event(type="purchase"), False),
    ("timestamp in seconds", event(timestamp_ms=now_ms() // 1000), False),
    ("timestamp 6 days old", event(timestamp_ms=now_ms() - 6 * DAY_MS), True),
    ("timestamp 8 days old", event(timestamp_ms=now_ms() - 8 * DAY_MS), False),
    ("timestamp 11 minutes ahead", event(timestamp_ms=now_ms() + 11 * 60_000), False),
    ("hashed email not hex", event(user__emails_sha256=["abc"]), False),
    ("singular hashed field", event(user__email_sha256=H), False),
    ("countries", event(user__countries=["us", "FR"]), True),
    ("country alpha-3", event(user__countries=["USA"]), False),
    ("ip address", event(user__ip_address="2001:db8::1"), True),
    ("bad ip address", event(user__ip_address="999.1.1.1"), False),
    ("postal codes", event(user__postal_codes=["SW1A 1AA", "94107-1234"]), True),
    ("postal code underscore", event(user__postal_codes=["SW1A_1AA"]), False),
    ("postal code 33 characters", event(user__postal_codes=["1" * 33]), False),
    ("region 128 characters", event(user__regions=["r" * 128]), True),
    ("region 129 characters", event(user__regions=["r" * 129]), False),
    ("city 129 characters", event(user__cities=["c" * 129]), False),
    ("obref", event(user__obref="fb.1.1700000000.abc"), True),
    ("blank obref", event(user__obref="   "), False),
    ("gaid", event(user__android_advertising_id="38400000-8cf0-11bd-b23e-10b96e40000d"), True),
    ("gaid not a uuid", event(user__android_advertising_id="38400000-8cf0"), False),
]


async def sandbox_verdict(url: str, body: bytes) -> bool:
    async with ConversionsClient(base_url=url, api_key=DEFAULT_KEY, pixel_id=DEFAULT_PIXEL) as c:
        try:
            await c.send([body], validate_only=True)
        except InvalidEventError:
            return False
    return True


@pytest.mark.parametrize(("case", "evt", "ok"), CASES, ids=[c[0] for c in CASES])
def test_producer_and_sandbox_agree_with_the_contract(
    redis_url: str, sandbox: SandboxThread, case: str, evt: dict[str, Any], ok: bool
) -> None:
    settings = make_settings(sandbox, redis_url, strict_identifiers=True)
    if isinstance(evt.get("timestamp_ms"), int):
        evt = {**evt, "timestamp_ms": evt["timestamp_ms"] + now_ms() - BUILT_MS}
    with SyncProducer.from_settings(settings) as producer:
        try:
            queued = producer.enqueue(evt)
        except EventRejected:
            queued = False
    assert queued is ok, "producer"
    assert asyncio.run(sandbox_verdict(sandbox.url, orjson.dumps(evt))) is ok, "sandbox"
    queued_json = [f[b"e"] for _, f in redis.Redis.from_url(redis_url).xrange("capi:events")]
    assert len(queued_json) == int(ok)
    for body in queued_json:  # what capi would send is accepted too
        assert asyncio.run(sandbox_verdict(sandbox.url, body)), "sandbox, as queued"


# The cases the API refuses over an optional identifier's value (not over a field name).
IDENTIFIER_CASES = [
    c
    for c in CASES
    if not c[2]
    and (set(c[1]["user"]) != {"emails_sha256"} or c[0] == "hashed email not hex")
    and not set(c[1]["user"]) & {"email_sha256", "country", "city", "zip_code"}
]


@pytest.mark.parametrize(
    ("case", "evt", "ok"), IDENTIFIER_CASES, ids=[c[0] for c in IDENTIFIER_CASES]
)
def test_a_bad_optional_identifier_is_left_out_and_what_is_queued_is_accepted(
    redis_url: str, sandbox: SandboxThread, case: str, evt: dict[str, Any], ok: bool
) -> None:
    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many([evt])
    assert report.queued == 1 and report.warnings[0], report
    assert all(w.path.startswith("user.") for w in report.warnings[0])
    (body,) = [f[b"e"] for _, f in redis.Redis.from_url(redis_url).xrange("capi:events")]
    assert asyncio.run(sandbox_verdict(sandbox.url, body)), "sandbox, as queued"


def test_the_sandbox_does_not_judge_with_capis_validation() -> None:
    for module in (contract, state):
        tree = ast.parse(inspect.getsource(module))
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"capi.events", "capi.schema", "capi.hashing", "capi.jsondata"}


# (case, sandbox settings): rejections naming events[i] in some way capi has never seen, or
# naming no index at all; the doomed events alone are dead-lettered, as replayable.
REJECTION_STYLES: list[tuple[str, dict[str, Any]]] = [
    ("unknown 400 code", {"rejection_code": "brand_new_code"}),
    ("400 without a code", {"rejection_code": None}),
    ("422 that is not about time", {"rejection_status": 422, "rejection_code": "unprocessable"}),
    ("index only in errors", {"rejection_code": "other", "index_in_param": False}),
    ("422 naming no index", {"rejection_status": 422, "report_index": False}),
]


@pytest.mark.parametrize(("case", "config"), REJECTION_STYLES, ids=[c[0] for c in REJECTION_STYLES])
def test_rejections_whatever_their_code_cost_only_their_event(
    redis_url: str, sandbox: SandboxThread, case: str, config: dict[str, Any]
) -> None:
    sandbox.state.configure(config)
    settings = make_settings(sandbox, redis_url, batch_size=100)
    evts = events(100)
    enqueue(settings, evts)
    doomed = doom(settings, positions=[17, 80])
    drain(settings)
    dls = dead_letters(settings)
    assert set(dls) == set(doomed)
    assert {d["reason"] for d in dls.values()} == {"invalid_event"}
    assert all(d["replayable"] for d in dls.values())
    assert all("Invalid event" in d["guidance"] for d in dls.values())  # the API's words
    assert set(sandbox.state.delivered_ids()) == ids(evts) - set(doomed)


def test_accepted_events_differing_from_the_batch_is_logged_and_counted(
    redis_url: str, sandbox: SandboxThread, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.test_deadletters_cli import cli_run

    sandbox.state.configure({"accepted_delta": -1})
    settings = make_settings(sandbox, redis_url, batch_size=50)
    enqueue(settings, events(50))
    sender = drain(settings)
    assert len(sandbox.state.delivered_ids()) == 50
    assert sender.metrics.accepted_mismatches._value.get() == 1
    [record] = [r for r in caplog.records if "accepted_events=49 for 50" in r.getMessage()]
    assert record.levelname == "WARNING"
    status = cli_run(settings, "status", "--json").output
    assert orjson.loads(status)["counters"]["accepted_mismatches"] == 1
    assert "accepted_events mismatches: 1" in cli_run(settings, "status").output


def test_a_purchase_with_item_prices_in_the_event_currency_is_delivered(
    redis_url: str, sandbox: SandboxThread
) -> None:
    from capi.events import purchase

    settings = make_settings(sandbox, redis_url)
    order = purchase(
        "o-items",
        amount=2500,
        currency="EUR",
        contents=[{"id": "sku-1", "quantity": 2, "amount": 1000}, {"id": "sku-2", "amount": 500}],
        email="buyer@example.com",
        source_url="https://shop.example/thanks",
    )
    enqueue(settings, [order])
    drain(settings)
    assert sandbox.state.delivered_ids() == {"o-items": 1}
    assert not dead_letters(settings)
