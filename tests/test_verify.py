"""``capi verify``: the Advertiser API's event monitoring read back (from the sandbox's
imitation of it) and compared with what a real worker delivered."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from capi.sandbox import SandboxThread
from capi.sandbox.monitoring import DEFAULT_ADVERTISER_KEY
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from capi.tail import Line
from capi.verify import ReadBackError, Sample, Seen, compare, parse
from tests.helpers import capi, enqueue, events, make_settings, start_worker


def delivered_through_a_worker(sandbox: SandboxThread, redis_url: str, **kw: Any) -> Settings:
    settings = make_settings(
        sandbox,
        redis_url,
        advertiser_key=DEFAULT_ADVERTISER_KEY,
        ads_api_base_url=sandbox.url,
        **kw,
    )
    enqueue(settings, events(10))
    worker = start_worker(settings, "--burst")
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert len(sandbox.state.delivered_ids()) == 10
    return settings


def verify(settings: Settings, *args: str) -> tuple[int, dict[str, Any] | str]:
    done = capi(settings, "verify", "--grace", "0", *args)
    if "--json" in args:
        return done.returncode, json.loads(done.stdout.splitlines()[0])
    return done.returncode, done.stdout + done.stderr


def test_every_recent_delivery_is_found_and_pixel_events_are_matched(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = delivered_through_a_worker(sandbox, redis_url)
    both = ["s-1", "p-2"]
    pixel = [{"id": i, "type": "page_viewed", "timestamp_ms": 1} for i in [*both, "pix-only"]]
    httpx.post(sandbox.url + "/_sandbox/pixel", json={"pid": DEFAULT_PIXEL, "events": pixel})
    code, report = verify(settings, "--json")
    assert code == 0, report
    assert isinstance(report, dict)
    assert report["found"] == 10 and report["missing"] == [] and report["consistent"]
    assert report["both_channels"] == sorted(both)
    code, text = verify(settings)
    assert code == 0 and "the API shows 10 of 10 events capi delivered" in str(text)
    assert "2 seen from both the Pixel and capi" in str(text)


def test_ids_the_api_does_not_show_are_named_and_fail_the_check(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = delivered_through_a_worker(sandbox, redis_url)
    sandbox.state.monitoring.hidden = {"s-3", "p-4"}
    code, report = verify(settings, "--json")
    assert code == 1
    assert isinstance(report, dict)
    assert sorted(report["missing"]) == ["p-4", "s-3"] and report["found"] == 8
    code, text = verify(settings)
    assert code == 1 and "not shown yet: " in str(text) and "s-3" in str(text)


def test_a_fresh_delivery_within_the_grace_period_is_pending_not_missing(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = delivered_through_a_worker(sandbox, redis_url)
    sandbox.state.monitoring.hidden = {"s-3"}
    done = capi(settings, "verify", "--json")  # the default grace: two minutes
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["missing"] == [] and "s-3" in report["pending"]


def test_an_account_without_the_stream_gets_one_line_about_404(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = delivered_through_a_worker(sandbox, redis_url)
    sandbox.state.monitoring.enabled = False
    code, text = verify(settings)
    assert code == 3
    assert "event monitoring is not enabled for this ad account (HTTP 404)" in str(text)
    assert "Traceback" not in str(text)


def test_the_wrong_keys_are_refused_with_what_to_use(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = delivered_through_a_worker(sandbox, redis_url)
    conversion = settings.model_copy(update={"advertiser_key": settings.api_key})
    code, text = verify(conversion)
    assert code == 3 and "holds the Conversion Key" in str(text)
    assert DEFAULT_KEY not in str(text)
    unknown = make_settings(
        sandbox, redis_url, advertiser_key="sk-ads-unknown-0009", ads_api_base_url=sandbox.url
    )
    code, text = verify(unknown)
    assert code == 3 and "was refused (HTTP 401" in str(text) and "Advertiser API key" in str(text)
    none = make_settings(sandbox, redis_url, ads_api_base_url=sandbox.url)
    code, text = verify(none)
    assert code == 3 and "set CAPI_ADVERTISER_KEY" in str(text)


def test_an_empty_window_says_send_some_events_first(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(
        sandbox, redis_url, advertiser_key=DEFAULT_ADVERTISER_KEY, ads_api_base_url=sandbox.url
    )
    code, text = verify(settings)
    assert code == 1 and "send some events first" in str(text)


def line(event_id: str, time_ms: int, timestamp_ms: int = 0) -> Line:
    return Line(time_ms, "d", event_id, "order_created", "delivered", [], timestamp_ms)


def test_a_full_sample_expects_only_deliveries_after_the_oldest_it_shows() -> None:
    now = 10_000_000
    old = [line(f"old-{i}", now - 300_000, timestamp_ms=1_000) for i in range(100)]
    new = [line(f"new-{i}", now - 200_000 + i, timestamp_ms=5_000) for i in range(50)]
    shown = [Seen(f"new-{i}", "server_to_server", 5_000) for i in range(50) if i != 25]
    report = compare("d", old + new, Sample(shown, full=True), now_ms=now, grace_s=60)
    assert report.found == 49 and report.missing == ["new-25"]


def test_a_full_sample_cut_inside_a_batch_misses_nothing() -> None:
    # 80 events sent in two batches whose event timestamps are in no particular order: the
    # API's newest 50 hold the whole second batch and part of the first.
    now = 10_000_000
    first = [line(f"a-{i}", now - 200_000, timestamp_ms=(i * 7919) % 80) for i in range(40)]
    second = [line(f"b-{i}", now - 199_000, timestamp_ms=(i * 104729) % 80) for i in range(40)]
    shown = [Seen(x.id, "server_to_server", x.timestamp_ms) for x in first[30:] + second]
    report = compare("d", first + second, Sample(shown, full=True), now_ms=now, grace_s=0)
    assert report.found == 50 and report.missing == [] and report.consistent


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        (b'{"object":"list","data":[{"id":"a","channel":"pixel_sdk"}],"has_more":false}', ["a"]),
        (b'{"events":[{"event_id":"b","source":"server_to_server"}]}', ["b"]),
    ],
)
def test_the_answer_is_read_in_the_shapes_it_may_take(body: bytes, ids: list[str]) -> None:
    assert [s.id for s in parse(body).events] == ids


@pytest.mark.parametrize(
    "body", [b"not json", b'{"object":"list"}', b'{"data":[{"id":"a"}]}', b'{"data":[7]}']
)
def test_an_unreadable_answer_is_one_clear_error(body: bytes) -> None:
    with pytest.raises(ReadBackError) as caught:
        parse(body)
    assert caught.value.kind == "unreadable"
