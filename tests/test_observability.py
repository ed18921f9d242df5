"""Metrics, health and logs of a real worker process: counters served, no key, no raw PII."""

from __future__ import annotations

import json
import signal

from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from tests.conftest import free_port
from tests.helpers import doom, enqueue, events, make_settings, wait_for
from tests.helpers import http_get as get
from tests.test_worker_process import worker

SERVED = (
    'capi_events_delivered_total{destination="default"} 599.0',
    'capi_events_dead_lettered_total{destination="default",reason="invalid_event"} 1.0',
    'capi_events_retried_total{destination="default",reason="network"}',
    'capi_transient_key_failures_total{destination="default",reason="missing_scope"}',
    "capi_batch_size_events_bucket",
    "capi_send_latency_seconds_count",
    'capi_queue_depth_events{destination="default"} 0.0',
    'capi_in_flight_events{destination="default"} 0.0',
    'capi_oldest_event_age_seconds{destination="default"} 0.0',
    'capi_retry_batches_scheduled{destination="default"} 0.0',
    'capi_key_ok{destination="default"} 1.0',
)


def test_metrics_health_and_json_logs(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=50)
    evts = events(600)
    enqueue(settings, evts)
    [doomed_id] = doom(settings, positions=[10])
    sandbox.state.faults = [Fault("missing_scope", every=5), Fault("drop", every=7)]
    port = free_port()
    proc = worker(settings, "--log-json", "--metrics-port", str(port))
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 599, timeout_s=40, what="delivery")
    # The counters and gauges trail the deliveries the sandbox saw: wait for all of them.
    missing: list[str] = list(SERVED)

    def all_served() -> bool:
        status, metrics = get(base + "/metrics")
        missing[:] = [needle for needle in SERVED if status != 200 or needle not in metrics]
        return not missing

    try:
        wait_for(all_served, timeout_s=30, what="metrics")
    except AssertionError:
        raise AssertionError(f"not served within 30 s: {missing}") from None
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz") == (200, "ok\n")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert DEFAULT_KEY not in output
    assert "@example.com" not in output
    delivered = [r for r in records if r["message"].startswith("delivered")]
    assert delivered and all(r["request_id"].startswith("req_sbx_") for r in delivered)
    assert all(r["first_id"] and r["last_id"] for r in delivered)
    dead = [r for r in records if r["message"].startswith("dead-lettered")]
    assert dead[0]["event_ids"] == [doomed_id] and dead[0]["reason"] == "invalid_event"
    retried = [r for r in records if r["message"].startswith("retrying")]
    assert retried and all(r["event_ids"] and r["reason"] for r in retried)
