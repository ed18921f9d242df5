"""Every failure class, from real HTTP answers of the sandbox (and a scripted raw server)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import orjson
import pytest

from capi.client import ConversionsClient, classify
from capi.errors import InvalidEventError, NetworkError, SendError
from capi.events import now_ms, prepare, signup
from capi.failures import Reason
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY


def event(i: int = 0, **changes: Any) -> bytes:
    raw = signup(f"e-{i}", email=f"u{i}@example.com", source_url="https://a.example/")
    raw.update(changes)
    return prepare(raw).json


async def send(
    url: str,
    events: list[bytes],
    key: str = DEFAULT_KEY,
    pixel: str = DEFAULT_PIXEL,
    validate_only: bool = False,
) -> Any:
    async with ConversionsClient(base_url=url, api_key=key, pixel_id=pixel, timeout_s=2) as c:
        return await c.send(events, validate_only=validate_only)


def failure(url: str, events: list[bytes], **kw: Any) -> SendError:
    with pytest.raises(SendError) as info:
        asyncio.run(send(url, events, **kw))
    return info.value


def test_success_reports_accepted_events_and_request_id(sandbox: SandboxThread) -> None:
    ok = asyncio.run(send(sandbox.url, [event(1), event(2)]))
    assert ok.accepted_events == 2
    assert ok.request_ids["x-request-id"].startswith("req_sbx_")
    assert sandbox.state.delivered_ids() == {"e-1": 1, "e-2": 1}


def test_validate_only_saves_nothing(sandbox: SandboxThread) -> None:
    ok = asyncio.run(send(sandbox.url, [event(1)], validate_only=True))
    assert ok.accepted_events == 1
    assert not sandbox.state.delivered_ids()


@pytest.mark.parametrize(
    ("setup", "reason", "status"),
    [
        ({"key": DEFAULT_SCOPELESS_KEY}, Reason.MISSING_SCOPE, 401),
        ({"key": "sk-typo"}, Reason.UNAUTHORIZED, 401),
        ({"pixel": "no-such-pixel"}, Reason.UNKNOWN_PIXEL, 403),
        ({"fault": Fault("rbac", every=1)}, Reason.ACCESS_DENIED, 403),
        ({"fault": Fault("missing_scope", every=1)}, Reason.MISSING_SCOPE, 401),
        ({"fault": Fault("rate_limit", every=1, retry_after_s=7)}, Reason.RATE_LIMITED, 429),
        ({"fault": Fault("server_error", every=1, status=502)}, Reason.SERVER_ERROR, 502),
        ({"fault": Fault("drop", every=1)}, Reason.NETWORK, None),
    ],
)
def test_failure_classes(
    sandbox: SandboxThread, setup: dict[str, Any], reason: Reason, status: int | None
) -> None:
    if "fault" in setup:
        sandbox.state.faults = [setup["fault"]]
    kw = {k: v for k, v in setup.items() if k in ("key", "pixel")}
    error = failure(sandbox.url, [event()], **kw)
    assert error.reason is reason
    assert error.status == status
    assert error.retryable is reason.retryable
    if status is not None:
        assert error.request_id is not None


def test_missing_scope_names_the_scope_and_retry_after_is_parsed(sandbox: SandboxThread) -> None:
    error = failure(sandbox.url, [event()], key=DEFAULT_SCOPELESS_KEY)
    assert error.response.missing_scopes == ["ads.third_party_events.write"]
    sandbox.state.faults = [Fault("rate_limit", every=1, retry_after_s=7)]
    assert failure(sandbox.url, [event()]).response.retry_after_s == 7.0


def test_invalid_event_exposes_its_index(sandbox: SandboxThread) -> None:
    batch = [event(i) for i in range(5)]
    batch[3] = batch[3].replace(b'"type":"customer_action"', b'"type":"customer_action","coupon":1')
    error = failure(sandbox.url, batch)
    assert isinstance(error, InvalidEventError)
    assert error.event_index == 3
    assert error.response.param == "events[3]"
    assert error.response.body["error"]["errors"][0]["code"] == "unknown_data_field"
    assert not sandbox.state.delivered_ids()  # one bad event fails the whole batch


def test_stale_event_is_outside_time_window(sandbox: SandboxThread) -> None:
    stale = orjson.loads(event(1))
    stale["timestamp_ms"] = now_ms() - 8 * 86_400_000
    error = failure(sandbox.url, [event(0), orjson.dumps(stale)])
    assert error.reason is Reason.OUTSIDE_TIME_WINDOW
    assert error.status == 422
    assert error.response.event_index == 1


def test_unreachable_endpoint_is_a_network_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = failure(f"http://127.0.0.1:{port}", [event()])
    assert isinstance(error, NetworkError)
    assert error.retryable


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason", "scopes"),
    [
        (401, {}, b'{"error":{"message":"Unauthorized","code":null}}', Reason.UNAUTHORIZED, []),
        (
            401,
            {},
            b'{"error":{"message":"You have insufficient permissions for this operation. '
            b'Missing scopes: api.responses.read, api.responses.write. Check that..."}}',
            Reason.MISSING_SCOPE,
            ["api.responses.read", "api.responses.write"],
        ),
        (
            401,
            {},
            b'{"error":"You have insufficient permissions for this operation. Missing '
            b'scopes: api.management.write. Check"}',
            Reason.MISSING_SCOPE,
            ["api.management.write"],
        ),
        (401, {}, b"RBAC: access denied", Reason.ACCESS_DENIED, []),
        (
            403,
            {},
            b'{"error":{"message":"403: unknown pid","type":"server_error"}}',
            Reason.UNKNOWN_PIXEL,
            [],
        ),
        # A 400 naming no event and no field: the sender bisects (one event alone is that
        # event's fault).
        (400, {}, b'{"error":{"message":"Invalid request"}}', Reason.INVALID_EVENT, []),
        # errors[].param describes an event's field, not the request's: bisect.
        (
            400,
            {},
            b'{"error":{"message":"Invalid event","errors":[{"param":"data.coupon"}]}}',
            Reason.INVALID_EVENT,
            [],
        ),
        # A 400 naming a request-level field: the destination's settings, not an event.
        (
            400,
            {},
            b'{"error":{"message":"Missing required field: events"}}',
            Reason.REQUEST_INVALID,
            [],
        ),
        (
            400,
            {},
            b'{"error":{"message":"bad value","param":"validate_only"}}',
            Reason.REQUEST_INVALID,
            [],
        ),
        (
            422,
            {},
            b'{"detail":[{"loc":["query","pid"],"msg":"Field required"}]}',
            Reason.REQUEST_INVALID,
            [],
        ),
        # events[i] named: that event's rejection, whatever the message says.
        (
            400,
            {},
            b'{"error":{"message":"access denied: rbac missing scope","param":"events[1]"}}',
            Reason.INVALID_EVENT,
            [],
        ),
        (
            422,
            {},
            b'{"error":{"message":"RBAC","errors":[{"param":"events[0].data","code":"x"}]}}',
            Reason.INVALID_EVENT,
            [],
        ),
        (413, {}, b"<html>Request Entity Too Large</html>", Reason.TOO_LARGE, []),
        (404, {}, b"<html>not found</html>", Reason.NOT_FOUND, []),
        (503, {"retry-after": "3"}, b"", Reason.SERVER_ERROR, []),
        (
            422,
            {},
            b'{"error":{"code":"event_timestamp_too_old","param":"events[4].timestamp_ms"}}',
            Reason.OUTSIDE_TIME_WINDOW,
            [],
        ),
    ],
)
def test_classify_table(
    status: int, headers: dict[str, str], body: bytes, reason: Reason, scopes: list[str]
) -> None:
    error = classify(status, headers, body)
    assert error.reason is reason
    if scopes:
        assert error.response.missing_scopes == scopes


def test_trace_headers_are_all_kept() -> None:
    error = classify(
        500, {"X-Request-ID": "req_1", "traceparent": "00-ab-cd-01", "x-other": "n"}, b""
    )
    assert error.response.request_ids == {"x-request-id": "req_1", "traceparent": "00-ab-cd-01"}


def test_the_key_never_shows_in_errors_reprs_or_logs(
    sandbox: SandboxThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-proj-THIS-IS-THE-SECRET-KEY-123456"
    errors = [failure(sandbox.url, [event()], key=secret)]
    sandbox.state.faults = [Fault("drop", every=1)]
    errors.append(failure(sandbox.url, [event()], key=DEFAULT_KEY))
    client = ConversionsClient(base_url=sandbox.url, api_key=secret, pixel_id="p")
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [repr(client), caplog.text]
    texts += [repr(e.response) for e in errors]
    for text in texts:
        assert secret not in text
        assert DEFAULT_KEY not in text
    assert errors[0].key_fingerprint in str(errors[0])
    asyncio.run(client.aclose())


def body(code: str | None = None, param: str | None = None, **error: Any) -> bytes:
    return orjson.dumps({"error": {"message": "API words", "code": code, "param": param, **error}})


# (case, status, body, reason, event index): any 400/422 naming events[i] is that event's
# rejection whatever its code; "too old" only when the code or a 422's param says so.
REJECTIONS: list[tuple[str, int, bytes, Reason, int | None]] = [
    ("invalid_event", 400, body("invalid_event", "events[3]"), Reason.INVALID_EVENT, 3),
    ("unknown code", 400, body("brand_new_code", "events[7].data"), Reason.INVALID_EVENT, 7),
    ("no code", 400, body(None, "events[2]"), Reason.INVALID_EVENT, 2),
    (
        "index only in errors",
        400,
        body("whatever", None, errors=[{"param": "events[5].user.x", "code": "y"}]),
        Reason.INVALID_EVENT,
        5,
    ),
    ("no index", 400, body("brand_new_code"), Reason.INVALID_EVENT, None),
    ("error as a string", 400, b'{"error": "bad"}', Reason.INVALID_EVENT, None),
    ("422 other code", 422, body("unprocessable", "events[1].data"), Reason.INVALID_EVENT, 1),
    ("422 no index", 422, body("unprocessable"), Reason.INVALID_EVENT, None),
    (
        "422 too old by code",
        422,
        body("event_timestamp_too_old", "events[4]"),
        Reason.OUTSIDE_TIME_WINDOW,
        4,
    ),
    (
        "422 too old by param",
        422,
        body(None, "events[6].timestamp_ms"),
        Reason.OUTSIDE_TIME_WINDOW,
        6,
    ),
    (
        "too old in errors",
        400,
        body("invalid_event", "events[0]", errors=[{"code": "event_timestamp_too_old"}]),
        Reason.OUTSIDE_TIME_WINDOW,
        0,
    ),
    (
        "400 future timestamp",
        400,
        body("timestamp_in_future", "events[8].timestamp_ms"),
        Reason.INVALID_EVENT,
        8,
    ),
    ("absurd index", 400, body("x", "events[" + "9" * 5000 + "]"), Reason.INVALID_EVENT, None),
]


@pytest.mark.parametrize(
    ("case", "status", "raw", "reason", "index"), REJECTIONS, ids=[r[0] for r in REJECTIONS]
)
def test_rejections_whatever_their_code(
    case: str, status: int, raw: bytes, reason: Reason, index: int | None
) -> None:
    from capi.guidance import diagnose

    error = classify(status, {}, raw)
    assert isinstance(error, InvalidEventError)
    assert (error.reason, error.event_index) == (reason, index)
    assert error.retryable is False
    assert error.reason.replayable is (reason is Reason.INVALID_EVENT)
    if b"API words" in raw:
        assert "API words" in diagnose(error).text  # the API's own message is the diagnosis


def test_a_deeply_nested_error_body_is_kept_as_text_so_its_dead_letter_reads_back() -> None:
    from capi.deadletters import DeadLetter, build
    from capi.queue import Entry

    deep = b'{"error": {"message": "m", "param": "events[0]", "x": ' + b"[" * 300 + b"]" * 300
    error = classify(400, {}, deep + b"}}")
    assert error.event_index == 0 and isinstance(error.response.body, str)
    record = build(
        Entry(b"1-0", event(), "e-0", now_ms()),
        reason=error.reason,
        guidance="g",
        error=error,
        key_fingerprint="fp",
        pixel_id="px",
        now_ms=now_ms(),
        attempted=True,
    )
    assert DeadLetter.model_validate_json(record.to_json()).error_body == record.error_body


@pytest.mark.parametrize(
    ("case", "status", "raw", "reason", "index"),
    [r for r in REJECTIONS if r[4] is not None],
    ids=[r[0] for r in REJECTIONS if r[4] is not None],
)
def test_the_one_event_a_rejection_names_has_the_answers_reason(
    case: str, status: int, raw: bytes, reason: Reason, index: int
) -> None:
    # What the worker dead-letters (and the replay dry run reports) is for_event's reason.
    error = classify(status, {}, raw)
    assert isinstance(error, InvalidEventError)
    assert error.for_event(index).reason is reason


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (body("unknown_data_field", "events[3].data.coupon"), True),
        (b'{"error": {"message": "Invalid event.", "param": "events[3]"}}', False),
        (b'{"error": {"message": "Invalid event.", "param": null}}', False),
    ],
)
def test_a_rejection_guides_to_the_field_only_when_the_api_named_one(
    raw: bytes, named: bool
) -> None:
    """An event isolated from a 400 that named no field was told to "fix the field named
    above": there was none."""
    from capi.guidance import diagnose

    error = classify(400, {}, raw)
    first = diagnose(error).fix[0]
    assert ("Fix the field named above" in first) is named, first
    assert ("The API named no field" in first) is not named, first
