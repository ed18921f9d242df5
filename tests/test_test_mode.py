"""Test mode: a ``validate_only`` destination's batches are checked by the API and saved
nowhere; its events are counted as validated, never as delivered, on every surface."""

from __future__ import annotations

import json
from pathlib import Path

from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from tests.conftest import free_port
from tests.helpers import (
    capi,
    enqueue,
    events,
    http_get,
    make_settings,
    start_worker,
    stop_worker,
    wait_for,
)


def test_a_validate_only_destination_is_validated_never_delivered(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, validate_only=True, batch_size=10)
    enqueue(settings, events(30))
    port = free_port()
    worker = start_worker(settings, "--metrics-port", str(port))
    try:
        wait_for(
            lambda: (
                'capi_events_validated_total{destination="default"} 30.0'
                in http_get(f"http://127.0.0.1:{port}/metrics")[1]
            ),
            30,
            "the validated counter",
        )
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
    finally:
        stop_worker(worker)
    assert sandbox.state.delivered_ids() == {}  # the sandbox saved nothing
    assert sandbox.state.summary()["validate_only_requests"] >= 3
    assert 'capi_events_delivered_total{destination="default"} 0.0' in metrics
    status = json.loads(capi(settings, "status", "--json").stdout)
    counters = status.get("counters") or status["destinations"]["default"]["counters"]
    assert counters.get("validated") == 30 and not counters.get("delivered")
    text = capi(settings, "status").stdout
    assert "validated:     30 (test mode" in text
    listed = json.loads(capi(settings, "destinations", "--json").stdout.splitlines()[0])
    assert listed["validated"] == 30 and listed["delivered"] == 0 and listed["validate_only"]
    tail = [json.loads(t) for t in capi(settings, "tail", "--json").stdout.splitlines()]
    assert {t["status"] for t in tail} == {"validated"} and len(tail) == 20


def test_validate_only_in_the_destinations_file(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    destinations = tmp_path / "destinations.toml"
    destinations.write_text(
        "[destinations.staging]\n"
        f'pixel_id = "{make_settings(sandbox, redis_url).pixel_id}"\n'
        'api_key_env = "STAGING_KEY"\n'
        "validate_only = true\n"
    )
    settings = make_settings(sandbox, redis_url, destinations_file=destinations)
    producer_events = events(5)
    done = capi(
        settings,
        "enqueue",
        "--destination",
        "staging",
        input="".join(json.dumps(e) + "\n" for e in producer_events),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    worker = start_worker(settings, "--burst", STAGING_KEY=DEFAULT_KEY)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert sandbox.state.delivered_ids() == {}
    assert "validated 5 events" in output
