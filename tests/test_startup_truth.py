"""The truth while a worker starts: during an endpoint outage its startup key check waits,
and /readyz, /metrics, ``capi status`` and ``capi health`` say so (not "Redis", not "ok",
not an empty queue); a key problem being confirmed shows as such, not as unchecked."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import (
    _plain,
    enqueue,
    events,
    http_get,
    make_settings,
    start_worker,
    wait_for,
)
from workers.cli import cli


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is killed at the end, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "CAPI_REDIS_URL": settings.redis_url,
        "CAPI_CONFIG_FILE": os.devnull,
        "CAPI_API_KEY": settings.api_key.get_secret_value() if settings.api_key else "",
        "CAPI_PIXEL_ID": DEFAULT_PIXEL,
        "CAPI_BASE_URL": settings.base_url,
    }


def status(settings: Settings) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["status", "--json"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.output)
    return parsed


def gauge(metrics: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else None


def start_arq_worker(settings: Settings) -> subprocess.Popen[str]:
    """``arq workers.main.WorkerSettings`` in a process of its own, configured by
    ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
    env["CAPI_CONFIG_FILE"] = os.devnull
    return subprocess.Popen(
        [sys.executable, "-m", "arq", "workers.main.WorkerSettings"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("how", ["capi worker", "arq"])
def test_a_worker_waiting_out_an_endpoint_outage_at_startup_says_so(
    redis_url: str, sandbox: SandboxThread, procs: list[subprocess.Popen[str]], how: str
) -> None:
    sandbox.state.faults = [Fault("server_error", every=1, status=503)]
    settings = make_settings(sandbox, redis_url, metrics_port=free_port())
    enqueue(settings, events(27))
    procs.append(start_worker(settings) if how == "capi worker" else start_arq_worker(settings))
    base = f"http://127.0.0.1:{settings.metrics_port}"

    def readyz() -> tuple[int, str]:
        return http_get(f"{base}/readyz")

    wait_for(lambda: "waiting for the endpoint" in readyz()[1], 30, "/readyz to say why")
    code, why = readyz()
    assert code == 503 and why.startswith("starting: key check waiting for the endpoint"), why
    assert "Redis" not in why
    metrics = http_get(f"{base}/metrics")[1]
    assert gauge(metrics, "capi_redis_up") == 1.0
    # The key's state is not known yet: a 0 would read as a held key (CapiKeyHeld pages
    # "missing scope, revoked key or unknown pixel" a minute later, for an outage).
    assert gauge(metrics, 'capi_key_ok{destination="default"}') is None, metrics
    wait_for(
        lambda: (
            gauge(http_get(f"{base}/metrics")[1], 'capi_queue_depth_events{destination="default"}')
            == 27.0
        ),
        10,
        "the queue depth gauge",
    )
    wait_for(lambda: status(settings)["workers"], 10, "the starting worker's heartbeat")
    now = status(settings)
    assert [w["state"] for w in now["workers"]] == ["starting"]
    assert now["endpoint"]["state"] == "unknown"
    assert "key check waiting for the endpoint" in now["endpoint"]["why"]
    text = CliRunner().invoke(cli, ["status"], env=cli_env(settings)).output
    assert "endpoint:      unknown: the worker is starting: key check waiting" in text
    health = CliRunner().invoke(cli, ["health"], env=cli_env(settings))
    assert health.exit_code == 1 and "not ready: worker starting: key check" in health.output

    sandbox.state.faults = []  # the endpoint is back: the worker starts and sends
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 27, 60, "delivery after the outage")
    wait_for(lambda: readyz() == (200, "ok\n"), 10, "ready")
    assert gauge(http_get(f"{base}/metrics")[1], 'capi_key_ok{destination="default"}') == 1.0
    wait_for(lambda: status(settings)["endpoint"]["state"] == "ok", 10, "the endpoint ok")


def test_status_claims_no_endpoint_state_without_a_live_worker(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(3))
    now = status(settings)
    assert now["workers_alive"] == []
    assert now["endpoint"]["state"] == "unknown" and now["endpoint"]["why"] == "no live worker"
    text = CliRunner().invoke(cli, ["status"], env=cli_env(settings)).output
    assert "endpoint:      unknown: no live worker (last delivery none yet)" in text
    assert "endpoint:      ok" not in text


def test_a_key_problem_being_confirmed_shows_as_confirming(
    redis_url: str, sandbox: SandboxThread, procs: list[subprocess.Popen[str]]
) -> None:
    # Four probes (pauses of 0.5, 1 and 1.5 s between them) before the key is called broken.
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=4
    )
    env = cli_env(settings)
    proc = start_worker(settings)
    procs.append(proc)

    def key_state() -> str:
        listed = CliRunner().invoke(cli, ["destinations", "--json"], env=env).output
        return str(json.loads(listed.splitlines()[0])["key_state"])

    wait_for(lambda: key_state() == "confirming", 20, "the key shown as confirming")
    text = CliRunner().invoke(cli, ["status"], env=env).output
    assert "key:           confirming since" in text and "(missing_scope)" in text
    # One destination, confirmed broken: the worker refuses to start, and says so.
    assert proc.wait(60) == 10
    assert key_state() == "unchecked"  # nothing holds it: no worker checks it now


def _dead_lettered_in_an_outage(
    redis_url: str, sandbox: SandboxThread, procs: list[subprocess.Popen[str]]
) -> tuple[Settings, str]:
    """A worker (in ``procs``) whose one event was dead-lettered past CAPI_MAX_ATTEMPTS
    while the endpoint failed (it still fails): its settings and its metrics server's URL."""
    settings = make_settings(sandbox, redis_url, max_attempts=2, metrics_port=free_port())
    procs.append(start_worker(settings))
    base = f"http://127.0.0.1:{settings.metrics_port}"
    wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "the worker to start")
    sandbox.state.faults = [Fault("server_error", every=1, retry_after_s=None)]
    enqueue(settings, events(1))
    wait_for(lambda: status(settings)["dead_letters"] == 1, 30, "the event dead-lettered")
    return settings, base


def test_an_idle_destination_is_not_failing_for_good_once_the_endpoint_answers(
    redis_url: str, sandbox: SandboxThread, procs: list[subprocess.Popen[str]]
) -> None:
    """The endpoint failed until the destination's events were dead-lettered (here past
    CAPI_MAX_ATTEMPTS), then came back: with nothing left to send no delivery says so, and
    /readyz, capi status and capi_endpoint_failing_since_seconds (CapiEndpointFailing) said
    "failing" for good. The worker asks the endpoint itself."""
    settings, base = _dead_lettered_in_an_outage(redis_url, sandbox, procs)
    assert status(settings)["endpoint"]["state"] == "failing"
    sandbox.state.faults = []  # the endpoint is back; nothing is queued
    wait_for(lambda: http_get(f"{base}/readyz") == (200, "ok\n"), 60, "/readyz ok")
    assert status(settings)["endpoint"]["state"] == "ok"
    failing = 'capi_endpoint_failing_since_seconds{destination="default"}'
    assert gauge(http_get(f"{base}/metrics")[1], failing) == 0.0


def test_a_restarted_worker_ends_the_failing_state_its_predecessor_left(
    redis_url: str, sandbox: SandboxThread, procs: list[subprocess.Popen[str]]
) -> None:
    """The worker that found the endpoint failing was killed (kill -9, a deploy) before its
    idle probe could see the endpoint answer again: Redis kept the failing mark, and the
    worker started in its place, knowing nothing of it, never probed. capi status said
    "failing" for good after the endpoint came back (fault campaign)."""
    settings, base = _dead_lettered_in_an_outage(redis_url, sandbox, procs)
    procs[0].kill()
    procs[0].communicate(timeout=30)
    assert status(settings)["endpoint"]["state"] == "failing"
    sandbox.state.faults = []  # the endpoint is back; nothing is queued
    procs.append(start_worker(settings))
    wait_for(lambda: http_get(f"{base}/readyz") == (200, "ok\n"), 60, "the new worker ready")
    wait_for(lambda: status(settings)["endpoint"]["state"] == "ok", 60, "capi status: endpoint ok")


@dataclasses.dataclass
class BDown:
    """Destinations a and b with one key; b's endpoint (``down``) answers 503 to everything
    until told otherwise, and a worker serves both."""

    down: SandboxThread
    settings: Settings
    env: dict[str, str]
    key: str

    def b_status(self) -> dict[str, Any]:
        result = CliRunner().invoke(cli, ["status", "--json"], env=self.env)
        assert result.exit_code == 0, result.output
        found: dict[str, Any] = json.loads(result.output)["destinations"]["b"]
        return found


@contextlib.contextmanager
def b_down(
    sandbox: SandboxThread, redis_url: str, tmp_path: Any, procs: list[Any], **overrides: Any
) -> Iterator[BDown]:
    with SandboxThread() as down:
        down.state.faults = [Fault("server_error", every=1, status=503)]
        path = tmp_path / "destinations.toml"
        path.write_text(
            f'[destinations.a]\npixel_id = "{DEFAULT_PIXEL}"\napi_key_env = "CAPI_KEY_A"\n\n'
            f'[destinations.b]\npixel_id = "{DEFAULT_PIXEL}"\napi_key_env = "CAPI_KEY_A"\n'
            f'base_url = "{down.url}"\n'
        )
        settings = make_settings(sandbox, redis_url, destinations_file=path, **overrides)
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        env = {**cli_env(settings), "CAPI_DESTINATIONS_FILE": str(path), "CAPI_KEY_A": key}
        procs.append(start_worker(settings, CAPI_KEY_A=key))
        yield BDown(down, settings, env, key)


def test_a_destination_whose_endpoint_fails_its_startup_check_is_not_shown_ok(
    redis_url: str, sandbox: SandboxThread, tmp_path: Any, procs: list[subprocess.Popen[str]]
) -> None:
    """Two destinations; b's endpoint answers 503 from the start, so b's startup key check
    waits while a is served. capi status and capi destinations said b's endpoint was "ok
    (last delivery none yet)" (the worker, serving a, was not "starting"), and nothing but
    the worker's log said b could not be reached (a base_url typo on day one)."""
    with b_down(sandbox, redis_url, tmp_path, procs, metrics_port=free_port()) as b:
        down, settings, env, b_status = b.down, b.settings, b.env, b.b_status
        wait_for(lambda: b_status()["key"]["state"] == "unchecked", 30, "b still unchecked")
        wait_for(lambda: b_status()["endpoint"]["state"] == "failing", 30, "b's endpoint failing")
        assert "503" in b_status()["endpoint"]["last_error"], b_status()["endpoint"]
        text = CliRunner().invoke(cli, ["status", "--destination", "b"], env=env).output
        assert "endpoint:      failing since" in text, text
        listed = CliRunner().invoke(cli, ["destinations", "--json"], env=env).output
        rows = {row["name"]: row for row in map(json.loads, listed.splitlines())}
        assert rows["b"]["endpoint"] == "failing" and rows["a"]["endpoint"] == "ok", rows
        # The worker's own line says what it waits for on b (it named only a, "idle").
        workers = json.loads(CliRunner().invoke(cli, ["status", "--json"], env=env).output)
        [line] = workers["workers"]
        assert "b: key check waiting for the endpoint" in line["detail"], line
        assert "b" in line["destination"].split(", "), line
        code, ready = http_get(f"http://127.0.0.1:{settings.metrics_port}/readyz")
        assert code == 200 and "b: key check waiting for the endpoint" in ready, ready

        down.state.faults = []  # the endpoint answers: b's check passes, b is ok again
        wait_for(lambda: b_status()["key"]["state"] == "ok", 60, "b's key checked")
        wait_for(lambda: b_status()["endpoint"]["state"] == "ok", 30, "b's endpoint ok")


def test_an_endpoint_that_answers_a_startup_check_with_a_key_refusal_is_not_left_failing(
    redis_url: str, sandbox: SandboxThread, tmp_path: Any, procs: list[subprocess.Popen[str]]
) -> None:
    """b's endpoint answers 503 to its startup key check (marked failing), then answers, but
    refuses the key (missing scope): b is held, and the endpoint answered. capi status kept
    saying "endpoint: failing since ... (503)" for as long as the hold lasted (a held
    destination does not probe its endpoint), sending the operator after the wrong thing."""
    with b_down(sandbox, redis_url, tmp_path, procs) as b:
        down, key, b_status = b.down, b.key, b.b_status
        wait_for(lambda: b_status()["endpoint"]["state"] == "failing", 30, "b's endpoint failing")
        down.state.conversion_keys.discard(key)  # the endpoint answers: the key lacks scope
        down.state.scopeless_keys.add(key)
        down.state.faults = []
        wait_for(lambda: b_status()["key"]["state"] == "held", 30, "b held")
        wait_for(lambda: b_status()["endpoint"]["state"] == "ok", 10, "b's endpoint ok")
