"""The shipped alert rules: valid, each with a firing and a quiet promtool test case, and
the alerts whose series a worker creates as it goes raised by a real Prometheus scraping a
real worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from capi import signup
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from tests.conftest import free_port
from tests.helpers import enqueue, events, make_settings, start_worker, stop_worker, wait_for
from tests.prometheus_helpers import CONFIG, ROOT, RULES, need, prometheus, query

TESTS = ROOT / "tests" / "prometheus" / "capi-alerts.test.yml"


def alerts() -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_the_rules_and_the_configuration_pass_promtool_check() -> None:
    promtool = need("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(CONFIG)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_and_stays_quiet_in_promtool_test_rules() -> None:
    promtool = need("promtool")
    done = subprocess.run(
        [promtool, "test", "rules", str(TESTS)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    cases = yaml.safe_load(TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(alerts()), "an alert without a firing case"
    assert quiet == set(alerts()), "an alert without a quiet case"


def test_every_alert_says_what_is_wrong_and_the_first_command_to_run() -> None:
    for name, rule in alerts().items():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"] and "First run: " in annotations["description"], name
        first = annotations["description"].split("First run: ", 1)[1]
        assert first.startswith(("capi ", "redis-cli ", "curl ")), name


def test_a_first_dead_letter_and_unmatchable_events_raise_their_alerts(
    redis_url: str, sandbox: SandboxThread, tmp_path: Path
) -> None:
    """A worker's first dead letters of a reason, and deliveries none of which carries a
    strong identifier, are what CapiDeadLettersIncreasing and CapiMatchCoverageLow exist
    for: the series they read must be there (at 0) before, or increase() and the coverage
    ratio see nothing and the alerts never fire."""
    settings = make_settings(sandbox, redis_url)
    port = free_port()
    worker = start_worker(settings, "--metrics-port", str(port))
    try:
        with prometheus(tmp_path, {"capi-worker": f"127.0.0.1:{port}"}) as url:
            ok = 'capi_key_ok{destination="default"} == 1'
            wait_for(lambda: query(url, ok), 60, "Prometheus to scrape a started worker")
            weak = [
                signup(
                    f"weak-{i}",
                    first_name="Ada",
                    last_name="Lovelace",
                    source_url="https://shop.example/welcome",
                )
                for i in range(3)
            ]  # a name alone: delivered, rarely matched
            enqueue(settings, weak)
            wait_for(lambda: len(sandbox.state.delivered_ids()) == 3, 30, "the deliveries")
            # Then the key stops working: the batch that meets it is dead-lettered.
            broken = {"conversion_keys": ["another"], "scopeless_keys": [DEFAULT_KEY]}
            sandbox.state.configure(broken)
            enqueue(settings, events(1, prefix="lost-"))

            def alerting(name: str) -> list[dict[str, str]]:
                return [r["metric"] for r in query(url, f'ALERTS{{alertname="{name}"}}')]

            wait_for(lambda: alerting("CapiDeadLettersIncreasing"), 60, "dead-letter alert")
            [dead] = alerting("CapiDeadLettersIncreasing")
            assert (dead["reason"], dead["alertstate"]) == ("missing_scope", "firing")
            wait_for(lambda: alerting("CapiMatchCoverageLow"), 60, "match coverage alert")
            [weakly] = alerting("CapiMatchCoverageLow")
            assert (weakly["destination"], weakly["alertstate"]) == ("default", "pending")
    finally:
        stop_worker(worker)
