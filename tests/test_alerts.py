"""The shipped alert rules: valid, and each with a firing and a quiet promtool test case."""

from __future__ import annotations

import subprocess

import yaml

from tests.prometheus_helpers import CONFIG, ROOT, RULES, need

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
