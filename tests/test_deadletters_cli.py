"""The operator CLI against real Redis and the sandbox: list, show, replay, purge, support."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner, Result

from capi.cli import cli
from capi.exitcodes import ExitCode
from capi.replay import Selection, replay, select
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from capi.settings import Settings
from tests.helpers import (
    dead_letters,
    doom,
    drain,
    enqueue,
    events,
    ids,
    make_settings,
    spawn,
    start_worker,
    stop_worker,
    wait_for,
)

SCOPE_FAILS, STALE, INVALID = 10, 4, 3


def cli_env(settings: Settings) -> dict[str, str]:
    """The CAPI_* variables that point the CLI at these settings' Redis and sandbox."""
    return {
        "CAPI_API_KEY": DEFAULT_KEY,
        "CAPI_PIXEL_ID": settings.pixel_id or "",
        "CAPI_BASE_URL": settings.base_url,
        "CAPI_REDIS_URL": settings.redis_url,
        "CAPI_CONFIG_FILE": os.devnull,
    }


def cli_run(settings: Settings, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        cli, list(args), env=cli_env(settings), input=input, catch_exceptions=False
    )


@pytest.fixture
def mixed(redis_url: str, sandbox: SandboxThread) -> Settings:
    """Dead letters of three reasons: a scopeless key, stale events, API-rejected events."""
    settings = make_settings(sandbox, redis_url, batch_size=SCOPE_FAILS, probe_confirmations=1)
    sandbox.state.conversion_keys.discard(DEFAULT_KEY)
    sandbox.state.scopeless_keys.add(DEFAULT_KEY)
    enqueue(settings, events(SCOPE_FAILS, prefix="scope-"))
    drain(settings)
    sandbox.state.scopeless_keys.discard(DEFAULT_KEY)
    sandbox.state.conversion_keys.add(DEFAULT_KEY)
    redis.Redis.from_url(redis_url).hset(settings.keys.key_state, "state", "ok")
    enqueue(settings, events(STALE, prefix="stale-"))
    later = time.time() + 8 * 86_400
    drain(settings, clock=lambda: later)
    bad = events(INVALID, prefix="bad-")
    enqueue(settings, bad)
    doom(settings, event_ids=ids(bad))
    drain(settings)
    sandbox.state.reset()
    return settings


def test_list_summary_filters_and_json(mixed: Settings) -> None:
    result = cli_run(mixed, "dead-letters", "list")
    assert result.exit_code == 0
    assert f"{SCOPE_FAILS + STALE + INVALID} dead letters" in result.output
    assert f"missing_scope {SCOPE_FAILS}" in result.output
    assert "never" in result.output  # stale events can never be replayed
    rows = [
        json.loads(line)
        for line in cli_run(
            mixed, "dead-letters", "list", "--json", "--reason", "missing_scope"
        ).output.splitlines()
    ]
    assert len(rows) == SCOPE_FAILS
    for row in rows:
        assert {
            "id",
            "reason",
            "guidance",
            "event",
            "status",
            "request_ids",
            "replay_deadline",
        } <= row.keys()
        assert row["status"] == 401 and "Conversion Key" in row["guidance"]
    expired = cli_run(mixed, "dead-letters", "list", "--expired", "--json").output.splitlines()
    assert len(expired) == STALE
    purchases = cli_run(mixed, "dead-letters", "list", "--type", "order_created", "--json")
    assert all(
        json.loads(x)["event_type"] == "order_created" for x in purchases.output.splitlines()
    )
    assert (
        cli_run(mixed, "dead-letters", "list", "--since", "1h", "--json").output.count("\n") == 17
    )
    assert cli_run(mixed, "dead-letters", "list", "--until", "1h", "--json").output == ""


def test_show_everything_with_a_redacted_curl(mixed: Settings) -> None:
    result = cli_run(mixed, "dead-letters", "show", "bad-p-0")
    assert result.exit_code == 0
    out = result.output
    for needle in (
        "invalid_event",
        "coupon",
        "request ids:",
        "req_sbx_",
        "first attempt:",
        "replay deadline:",
        "Guidance:",
        "curl -sS",
        "$CAPI_API_KEY",
        '"validate_only":true',
    ):
        assert needle in out, needle
    assert DEFAULT_KEY not in out
    assert cli_run(mixed, "dead-letters", "show", "nope").exit_code == ExitCode.NOT_FOUND


def test_replay_after_fix_delivers_once_and_a_second_replay_sends_nothing(
    mixed: Settings, sandbox: SandboxThread
) -> None:
    result = cli_run(mixed, "dead-letters", "replay", "--reason", "missing_scope")
    assert result.exit_code == 0, result.output
    assert f"replayed {SCOPE_FAILS} of {SCOPE_FAILS}" in result.output
    again = cli_run(mixed, "dead-letters", "replay", "--reason", "missing_scope")
    assert "replayed 0 of 0" in again.output
    drain(mixed)
    delivered = sandbox.state.delivered_ids()
    assert set(delivered) == ids(events(SCOPE_FAILS, prefix="scope-"))
    assert set(delivered.values()) == {1}
    audit = redis.Redis.from_url(mixed.redis_url).lrange(mixed.keys.replays, 0, -1)
    assert any(b'"status":"completed"' in a and b'"replayed":10' in a for a in audit)


def test_dry_run_queues_nothing_and_reports_each_event(
    mixed: Settings, sandbox: SandboxThread
) -> None:
    result = cli_run(mixed, "dead-letters", "replay", "--all", "--dry-run", "--json")
    assert result.exit_code == ExitCode.REFUSED  # some would be rejected
    rows = {r["id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert len(rows) == SCOPE_FAILS + STALE + INVALID
    assert all(rows[f"scope-{i}"]["accepted"] for i in ["p-0", "s-1"])
    assert rows["bad-p-0"]["reason"] == "invalid_event"
    assert rows["stale-p-0"]["reason"] == "past_replay_deadline"
    assert not sandbox.state.delivered_ids()
    client = redis.Redis.from_url(mixed.redis_url)
    assert client.xlen(mixed.keys.stream) == 0
    assert len(dead_letters(mixed)) == SCOPE_FAILS + STALE + INVALID


@pytest.mark.parametrize(
    ("fault", "code"),
    [("server_error", ExitCode.UNREACHABLE), ("missing_scope", ExitCode.MISSING_SCOPE)],
)
def test_a_dry_run_the_api_did_not_answer_is_not_a_rejection(
    mixed: Settings, sandbox: SandboxThread, fault: Any, code: ExitCode
) -> None:
    # A 503 (or a key failure) says nothing about the events: reporting them as "would be
    # rejected ... fix their cause" sent operators hunting for a fault in good events.
    sandbox.state.faults = [Fault(fault, every=1)]
    result = cli_run(mixed, "dead-letters", "replay", "--reason", "missing_scope", "--dry-run")
    assert result.exit_code == code, result.output
    assert "would be rejected" not in result.output
    assert f"scope-p-0: not checked: {fault}" in result.output
    assert f"{SCOPE_FAILS} not checked" in result.output
    rows = cli_run(
        mixed, "dead-letters", "replay", "--reason", "missing_scope", "--dry-run", "--json"
    )
    first = json.loads(rows.stdout.splitlines()[0])
    assert first["accepted"] is False and first["checked"] is False
    assert not sandbox.state.delivered_ids()


def test_past_deadline_events_are_skipped_and_reported(mixed: Settings) -> None:
    result = cli_run(mixed, "dead-letters", "replay", "--reason", "outside_time_window")
    assert "replayed 0 of 4" in result.output
    assert "4 past deadline" in result.output
    assert "skipped stale-p-0: past its replay deadline" in result.output
    assert redis.Redis.from_url(mixed.redis_url).xlen(mixed.keys.stream) == 0


def test_replay_needs_a_selection(mixed: Settings) -> None:
    result = CliRunner().invoke(
        cli, ["dead-letters", "replay"], env={"CAPI_REDIS_URL": mixed.redis_url}
    )
    assert result.exit_code == 2
    assert "say what to replay" in result.output


def test_interrupted_replay_resumes_without_loss_or_double_sends(
    mixed: Settings, sandbox: SandboxThread
) -> None:
    env = {**os.environ, "CAPI_REDIS_URL": mixed.redis_url, "CAPI_CONFIG_FILE": os.devnull}
    proc = spawn(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "dead-letters",
            "replay",
            "--reason",
            "missing_scope",
            "--rate",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis.from_url(mixed.redis_url)
    wait_for(lambda: client.xlen(mixed.keys.stream) >= 2, what="part of the replay")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert 0 < client.xlen(mixed.keys.stream) < SCOPE_FAILS
    result = cli_run(mixed, "dead-letters", "replay", "--reason", "missing_scope")
    assert result.exit_code == 0
    stream_ids = [orjson.loads(f[b"e"])["id"] for _, f in client.xrange(mixed.keys.stream)]
    assert sorted(stream_ids) == sorted(ids(events(SCOPE_FAILS, prefix="scope-")))
    drain(mixed)
    assert set(sandbox.state.delivered_ids().values()) == {1}
    assert len(sandbox.state.delivered_ids()) == SCOPE_FAILS


def test_rate_is_honoured(mixed: Settings) -> None:
    import asyncio

    import redis.asyncio as aioredis

    clock = {"t": 0.0}
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock["t"] += s

    async def go() -> float:
        client = aioredis.Redis.from_url(mixed.redis_url)
        records = await select(
            client, mixed.keys, Selection(reasons=["missing_scope"]), int(time.time() * 1000)
        )
        await replay(
            client, mixed.keys, records, rate_per_s=5, sleep=sleep, monotonic=lambda: clock["t"]
        )
        await client.aclose()
        return clock["t"]

    elapsed = asyncio.run(go())
    expected = SCOPE_FAILS / 5
    assert abs(elapsed - expected) <= 0.2 * expected


def test_purge_asks_exports_and_deletes(mixed: Settings, tmp_path: Any) -> None:
    declined = cli_run(mixed, "dead-letters", "purge", "--expired", input="n\n")
    assert "Nothing deleted" in declined.output
    assert len(dead_letters(mixed)) == SCOPE_FAILS + STALE + INVALID
    target = tmp_path / "expired.jsonl"
    done = cli_run(mixed, "dead-letters", "purge", "--expired", "--export", str(target), "--yes")
    assert f"purged {STALE}" in done.output
    exported = [json.loads(x) for x in target.read_text().splitlines()]
    assert {x["id"] for x in exported} == {f"stale-{k}" for k in ("p-0", "s-1", "p-2", "s-3")}
    assert len(dead_letters(mixed)) == SCOPE_FAILS + INVALID
    assert "Nothing to purge" in cli_run(mixed, "dead-letters", "purge", "--expired").output


def test_support_bundle_has_what_support_asks_for(mixed: Settings) -> None:
    out = cli_run(mixed, "support-bundle").output
    for needle in (
        "pixel id:",
        mixed.pixel_id or "",
        "key fingerprint:",
        "…0001",
        "first attempt (UTC):",
        "req_sbx_",
        "Missing scopes: ads.third_party_events.write",
        "capi version:",
        "<email of the person",
    ):
        assert needle in out, needle
    assert DEFAULT_KEY not in out


def test_no_command_output_shows_the_key_or_a_raw_email(mixed: Settings) -> None:
    outputs = [
        cli_run(mixed, *args).output
        for args in (
            ("dead-letters", "list"),
            ("dead-letters", "list", "--json"),
            ("dead-letters", "show", "scope-p-0"),
            ("dead-letters", "export"),
            ("status",),
            ("status", "--json"),
            ("support-bundle",),
            ("check-key",),
        )
    ]
    for text in outputs:
        assert DEFAULT_KEY not in text
        assert "@example.com" not in text


def test_status_shows_counts_and_key_state(mixed: Settings) -> None:
    status = json.loads(cli_run(mixed, "status", "--json").output)
    assert status["dead_letters"] == SCOPE_FAILS + STALE + INVALID
    assert status["dead_letters_by_reason"]["missing_scope"] == SCOPE_FAILS
    assert status["counters"]["dead_lettered"] == SCOPE_FAILS + STALE + INVALID
    assert status["key"]["state"] == "ok"
    assert "dead letters:  17" in cli_run(mixed, "status").output


def test_same_id_for_a_signup_and_an_order_keeps_both(
    redis_url: str, sandbox: SandboxThread
) -> None:
    from capi.events import purchase, signup

    settings = make_settings(sandbox, redis_url)
    pair = [
        signup("123", email="a@example.com", source_url="https://a.example/"),
        purchase("123", amount=100, currency="EUR", source_url="https://a.example/"),
    ]
    enqueue(settings, pair)
    sandbox.state.conversion_keys.discard(DEFAULT_KEY)
    sandbox.state.scopeless_keys.add(DEFAULT_KEY)
    drain(settings)  # both meet the broken key and are dead-lettered
    stored = redis.Redis.from_url(redis_url).hkeys(settings.keys.deadletters)
    assert sorted(stored) == [b"order_created:123", b"registration_completed:123"]
    shown = cli_run(settings, "dead-letters", "show", "123").output
    assert "registration_completed:123" in shown and "order_created:123" in shown
    one = cli_run(settings, "dead-letters", "show", "order_created:123", "--json").output
    assert json.loads(one)["event"]["type"] == "order_created"
    replayed = cli_run(settings, "dead-letters", "replay", "123")
    assert "replayed 2 of 2" in replayed.output


def test_support_bundle_of_an_unknown_id_says_so_and_exits_not_found(mixed: Settings) -> None:
    result = cli_run(mixed, "support-bundle", "scope-p-0", "no-such-order")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "not found: no-such-order" in result.output
    assert "event scope-p-0" in result.output  # what was found is still printed


def held_for_missing_scope(redis_url: str, sandbox: SandboxThread) -> tuple[Settings, Any]:
    """A worker running with DEFAULT_KEY, held after the key lost its scope (5 events
    dead-lettered); the key state's client."""
    settings = make_settings(
        sandbox, redis_url, batch_size=5, probe_confirmations=1, reprobe_interval_s=600
    )
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(settings)
    wait_for(lambda: client.hget(settings.keys.key_state, "state") == b"ok", 30, "the worker")
    sandbox.state.conversion_keys.discard(DEFAULT_KEY)  # the key loses its scope
    sandbox.state.scopeless_keys.add(DEFAULT_KEY)
    enqueue(settings, events(5, prefix="held-"))
    wait_for(lambda: len(dead_letters(settings)) == 5, 30, "the events dead-lettered")
    wait_for(lambda: client.hget(settings.keys.key_state, "state") == b"held", 30, "a hold")

    # The workers' first re-probe of the hold, over and failed (the key is still broken: it
    # wrote checked_at); the next is CAPI_REPROBE_INTERVAL_S away. (A key fixed before it
    # is released by it.)
    def reprobed() -> bool:
        state = client.hgetall(settings.keys.key_state)
        return state.get(b"state") == b"held" and state[b"checked_at"] > state[b"since"]

    wait_for(reprobed, 30, "the first re-probe")
    return settings, worker


def test_a_passing_check_key_releases_a_hold_so_a_replay_is_delivered_at_once(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """The guidance says: fix the key, run capi check-key, replay. The check passed, but the
    destination stayed held until the workers' next re-probe (CAPI_REPROBE_INTERVAL_S, here
    10 minutes), and the replayed events waited with it."""
    settings, worker = held_for_missing_scope(redis_url, sandbox)
    client = redis.Redis.from_url(redis_url)
    sandbox.state.scopeless_keys.discard(DEFAULT_KEY)  # the key is fixed
    sandbox.state.conversion_keys.add(DEFAULT_KEY)
    checked = cli_run(settings, "check-key")
    assert checked.exit_code == 0, checked.output
    assert (
        "destination default: was held (missing_scope) for this key, pixel and endpoint; "
        "released now" in checked.output
    ), checked.output
    assert "capi dead-letters replay --reason missing_scope" in checked.output
    assert client.hget(settings.keys.key_state, "state") == b"ok"
    replayed = cli_run(settings, "dead-letters", "replay", "--reason", "missing_scope")
    assert "replayed 5 of 5" in replayed.output, replayed.output
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 5, 30, "the replay delivered")
    log = cli_run(settings, "dead-letters", "replays").output
    assert "passed capi check-key: hold (missing_scope) released  by cli:" in log, log
    assert json.loads(cli_run(settings, "check-key", "--json").output)["hold"] == "none"
    stop_worker(worker)


def test_check_key_with_another_key_than_the_workers_releases_no_hold(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """A fresh key in the CLI's settings passes, but the workers still send with the old
    one: releasing their hold made them dead-letter the replayed events again."""
    settings, worker = held_for_missing_scope(redis_url, sandbox)
    fresh = "sk-svcacct-sandbox-conversion-key-0003"
    sandbox.state.conversion_keys.add(fresh)
    env = {**cli_env(settings), "CAPI_API_KEY": fresh}
    checked = CliRunner().invoke(cli, ["check-key"], env=env)
    assert checked.exit_code == 0, checked.output
    assert "held (missing_scope) by workers with another key" in checked.output, checked.output
    assert redis.Redis.from_url(redis_url).hget(settings.keys.key_state, "state") == b"held"
    as_json = json.loads(CliRunner().invoke(cli, ["check-key", "--json"], env=env).output)
    assert as_json["ok"] and as_json["hold"] == "kept"
    assert fresh not in checked.output
    stop_worker(worker)


def test_replay_help_names_the_exit_code_of_a_dry_run_the_api_did_not_answer() -> None:
    # A dry run the API could not judge exits with check-key's code (14 for a 5xx, 10 for a
    # missing scope: the test above); --help named only 7 and 4, so a script reading 14 had
    # nothing to go by.
    text = " ".join(CliRunner().invoke(cli, ["dead-letters", "replay", "--help"]).output.split())
    assert "4 when the API would reject some of the events" in text
    assert "could not check" in text and "capi check-key" in text, text


def test_a_released_hold_of_a_named_destination_says_to_replay_only_that_destination(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a destinations file, check-key's release line said `capi dead-letters replay
    --reason missing_scope`, which replays every destination's (the guidance it follows
    names the destination)."""
    from capi.cli.main import _Hold, _say_holds

    _say_holds({"brand-b": _Hold("released", "missing_scope", True)})
    said = capsys.readouterr().out
    assert "capi dead-letters replay --destination brand-b --reason missing_scope" in said, said
    _say_holds({"default": _Hold("released", "missing_scope", True)})
    assert "capi dead-letters replay --reason missing_scope" in capsys.readouterr().out


def test_a_released_hold_of_a_file_destination_named_default_names_it_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A destinations file may name a destination "default" beside others: its release
    line left out --destination (the name alone was taken for the single-pixel set-up),
    so the replay it suggested replayed every destination's dead letters of that reason."""
    from capi.cli.main import _Hold, _say_holds

    _say_holds({"default": _Hold("released", "missing_scope", True)}, several=True)
    said = capsys.readouterr().out
    assert "capi dead-letters replay --destination default --reason missing_scope" in said, said
