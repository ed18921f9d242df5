"""The Grafana dashboard's queries, run by a real Prometheus scraping a real worker and a real
intake that deliver, retry, dead-letter and refuse events: every panel's query returns data,
and every metric the dashboard and the alert rules name is one capi exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from tests.conftest import free_port
from tests.helpers import doom, enqueue, events, make_settings, start_worker, stop_worker, wait_for
from tests.intake_helpers import start_intake
from tests.prometheus_helpers import ROOT, RULES, prometheus, query

DASHBOARD = ROOT / "config" / "grafana" / "capi-dashboard.json"


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel, Grafana's variables filled in
    as Grafana would for "All" over a short range."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$destination", ".*")
            expr = expr.replace("$__rate_interval", "30s").replace("$__range", "5m")
            found.append((panel["title"], expr))
    return found


def test_the_dashboard_is_importable_json_with_a_destination_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert "destination" in names
    assert all(p["targets"] and p["title"] for p in dashboard["panels"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_query_returns_data_from_a_real_prometheus(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=20, batch_wait_ms=50)
    enqueue(settings, events(200))
    doom(settings, positions=[3])  # one dead letter
    sandbox.state.faults = [  # retries, and a transient key failure
        Fault("server_error", every=4, retry_after_s=None),
        Fault("missing_scope", every=7, remaining=1),
    ]
    worker_port = free_port()
    worker = start_worker(settings, "--metrics-port", str(worker_port))
    intake = start_intake(tmp_path, redis_url, CAPI_PIXEL_ID=settings.pixel_id or "")
    try:
        targets = {"capi-worker": f"127.0.0.1:{worker_port}", "capi-intake": intake.url[7:]}
        with prometheus(tmp_path, targets) as url:
            bad = {"id": "bad-1", "type": "registration_completed"}  # refused: no timestamp
            [weak, denied] = events(2, start=2000, prefix="w-")
            weak["user"] = {**weak.get("user", {}), "phone": "12"}  # left out, event queued
            denied["consent"] = "denied"  # skipped under the default consent_policy drop
            for i in range(5):
                answer = intake.post([*events(4, start=1000 + 4 * i, prefix="in-"), bad])
                assert answer.status_code == 200, answer.text
            assert intake.post([weak, denied]).status_code == 200
            wait_for(lambda: len(sandbox.state.delivered_ids()) >= 220, 60, "deliveries")
            pending = {expr: title for title, expr in panel_queries()}

            def all_answer() -> bool:
                for expr in list(pending):
                    if query(url, expr):
                        del pending[expr]
                return not pending

            try:
                wait_for(all_answer, 60, "every panel's query to return data")
            except AssertionError:
                raise AssertionError(f"no data for: {pending}") from None
            exported = {r["metric"]["__name__"] for r in query(url, '{__name__=~"capi_.+"}')}
    finally:
        intake.stop()
        stop_worker(worker)
    named = set()
    for _, expr in panel_queries():
        named |= set(re.findall(r"\bcapi_[a-z_]+", expr))
    named |= set(re.findall(r"\bcapi_[a-z_]+", RULES.read_text()))
    assert named - exported == set(), "names a metric capi does not export"


def test_the_queue_panel_shows_the_queue_once_whatever_the_number_of_workers(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    """Every worker exports the same queue gauges (read from Redis): with two workers (the
    README scales to three), the panel shows 30 queued events as 30, not 60."""
    settings = make_settings(sandbox, redis_url)
    ports = [free_port(), free_port()]
    workers = [start_worker(settings, "--metrics-port", str(port)) for port in ports]
    try:
        targets = {"capi-worker": [f"127.0.0.1:{p}" for p in ports]}
        with prometheus(tmp_path, targets) as url:
            ok = 'capi_key_ok{destination="default"} == 1'
            wait_for(lambda: len(query(url, ok)) == 2, 60, "both workers to have checked the key")
            # The key stops working: the first event is dead-lettered, the destination is
            # held by both workers, and what comes next stays queued.
            broken = {"conversion_keys": ["another"], "scopeless_keys": [DEFAULT_KEY]}
            sandbox.state.configure(broken)
            enqueue(settings, events(1))
            held = 'capi_key_ok{destination="default"} == 0'
            wait_for(lambda: len(query(url, held)) == 2, 60, "both workers to hold the key")
            enqueue(settings, events(30, start=100))
            depth = 'capi_queue_depth_events{destination="default"} == 30'
            wait_for(lambda: len(query(url, depth)) == 2, 60, "both workers to export 30 queued")
            panel = "Queue depth and in flight"
            [queued, in_flight, retries] = [e for t, e in panel_queries() if t == panel]
            assert [float(r["value"][1]) for r in query(url, queued)] == [30.0]
            assert [float(r["value"][1]) for r in query(url, in_flight)] == [0.0]
            assert [float(r["value"][1]) for r in query(url, retries)] == [0.0]
    finally:
        for worker in workers:
            stop_worker(worker)
