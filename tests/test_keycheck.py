"""``capi check-key`` against the sandbox: the right diagnosis and exit code per cause."""

from __future__ import annotations

import json
import socket
import time

import pytest
from click.testing import CliRunner

from capi.cli import cli
from capi.exitcodes import ExitCode
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_SCOPELESS_KEY

ADVERTISER_KEY = "ads-advertiser-key-AAAA-BBBB-CCCC"


def run_check(monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> tuple[int, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CAPI_PROBE_CONFIRMATIONS", "2")
    result = CliRunner().invoke(cli, ["check-key", *args])
    return result.exit_code, result.output


def test_conversion_key_passes(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sandbox: SandboxThread
) -> None:
    code, output = run_check(monkeypatch)
    assert code == ExitCode.OK, output
    assert "can write events" in output
    assert DEFAULT_KEY not in output
    assert sandbox.state.validate_only_requests == 1
    assert not sandbox.state.delivered_ids()  # the probe is never saved


def test_platform_key_lacking_scope(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = run_check(monkeypatch, CAPI_API_KEY=DEFAULT_SCOPELESS_KEY)
    assert code == ExitCode.MISSING_SCOPE
    assert "ads.third_party_events.write" in output
    assert "Manage conversion keys" in output
    assert "platform project key" in output  # the sk-proj- shape sharpens the hint
    assert "fresh Conversion Key instead of editing" in output
    assert DEFAULT_SCOPELESS_KEY not in output


def test_advertiser_key_lacking_scope(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sandbox: SandboxThread
) -> None:
    sandbox.state.scopeless_keys.add(ADVERTISER_KEY)
    code, output = run_check(monkeypatch, CAPI_API_KEY=ADVERTISER_KEY)
    assert code == ExitCode.MISSING_SCOPE
    assert "Advertiser (Ads API) keys" in output
    assert ADVERTISER_KEY not in output


def test_unknown_key(capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = run_check(monkeypatch, CAPI_API_KEY="sk-svcacct-revoked-key-999")
    assert code == ExitCode.UNAUTHORIZED
    assert "does not recognise the key" in output
    assert "revoked-key-999" not in output
    assert "…-999" in output  # the fingerprint's tail identifies it


def test_unknown_pixel(capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = run_check(monkeypatch, CAPI_PIXEL_ID="wrong-pixel")
    assert code == ExitCode.UNKNOWN_PIXEL
    assert "'wrong-pixel'" in output
    assert "same ad account" in output


def test_unreachable_endpoint(capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, output = run_check(monkeypatch, CAPI_BASE_URL=f"http://127.0.0.1:{port}")
    assert code == ExitCode.UNREACHABLE
    assert "could not be reached" in output
    # Nothing answered: the diagnosis said "API said: 'ConnectError: ...'".
    assert "API said" not in output, output
    assert "[no answer from the endpoint: 'ConnectError: All connection attempts" in output


def test_intermittent_scope_failure_does_not_fail_the_check(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sandbox: SandboxThread
) -> None:
    sandbox.state.faults = [Fault("missing_scope", every=1, remaining=1)]
    code, output = run_check(monkeypatch)
    assert code == ExitCode.OK, output


def test_json_output(capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = run_check(monkeypatch, "--json", CAPI_API_KEY=DEFAULT_SCOPELESS_KEY)
    data = json.loads(output)
    assert code == ExitCode.MISSING_SCOPE
    assert data["reason"] == "missing_scope"
    assert data["exit_code"] == ExitCode.MISSING_SCOPE
    assert data["request_ids"]["x-request-id"].startswith("req_sbx_")
    assert DEFAULT_SCOPELESS_KEY not in output


def test_missing_settings_name_the_variable(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPI_API_KEY")
    code, output = run_check(monkeypatch)
    assert code == ExitCode.CONFIG
    assert "CAPI_API_KEY" in output


def test_a_scope_failure_among_server_errors_is_not_confirmed(
    capi_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, sandbox: SandboxThread
) -> None:
    """Probes that met a 503 and then a missing scope confirmed nothing about the key (the
    503 says nothing): the check reports the endpoint's failure, not a missing scope; the
    worker's key guard therefore retries rather than holding every worker's sends."""
    sandbox.state.faults = [
        Fault("server_error", every=1, remaining=1, status=503),
        Fault("missing_scope", every=2, remaining=1),
    ]
    code, output = run_check(monkeypatch, "--json")
    data = json.loads(output)
    assert sandbox.state.requests == 2  # both probes were answered: 503, then the scope
    assert data["reason"] == "server_error", output
    assert code != ExitCode.MISSING_SCOPE


@pytest.mark.parametrize(
    "api_ahead_s",
    [
        8 * 86_400,  # this machine 8 days slow: 422 event_timestamp_too_old
        -3_600,  # this machine an hour fast: 400 invalid_event at events[0]
    ],
)
def test_a_refused_probe_event_blames_the_clock_not_the_users_events(
    capi_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox: SandboxThread,
    api_ahead_s: int,
) -> None:
    # The probe is capi's own event stamped with this machine's clock: when the API refuses
    # it, "fix the field where your backend builds the event; the other events of its batch
    # were delivered" is false. A skewed clock is the likely cause, and the one to name.
    sandbox.state.clock = lambda: time.time() + api_ahead_s
    exit_code, output = run_check(monkeypatch)
    assert exit_code != ExitCode.OK, output
    assert "synthetic" in output
    assert "clock" in output
    assert "other events of its batch were delivered" not in output
    assert "your backend builds the event" not in output
