"""What the operator reads: labelled figures, no ``None``/Python text, refusals of misspelled
filters, ids not found, exit-code meanings, check-key guidance meant for check-key, and which
Redis is used when it is the default."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner, Result

from capi import replay
from capi.exitcodes import ExitCode
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY
from capi.settings import Settings
from tests.helpers import drain, enqueue, events, make_settings
from workers.cli import cli


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> dict[str, str]:
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    return {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}


def invoke(env: dict[str, str], *args: str, **kw: Any) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, **kw)


@pytest.fixture
def one_missing_scope(env: dict[str, str], sandbox: SandboxThread, redis_url: str) -> None:
    """One dead letter: missing_scope, with an error code and no param."""
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1
    )
    enqueue(settings, events(1))
    drain(settings)


def test_status_labels_current_and_all_time_dead_letters(
    env: dict[str, str], one_missing_scope: None
) -> None:
    assert invoke(env, "dead-letters", "purge", "--all", "--yes").exit_code == 0
    output = invoke(env, "status").output
    assert "dead letters:  0 now" in output
    assert "all time, by reason (replayed and purged included): missing_scope 1" in output
    assert "None" not in output  # nothing queued: no "oldest None s"
    assert "transient_key_failures: 0" in output  # a space after every label, long or not
    assert "dead_lettered: 1" in output and "delivered:     0" in output  # still aligned


def test_show_list_and_replays_print_no_python_text(
    env: dict[str, str], one_missing_scope: None
) -> None:
    show = invoke(env, "dead-letters", "show", "p-0").output
    assert "(code missing_scope)" in show and "None" not in show
    listing = invoke(env, "dead-letters", "list").output
    assert "1 dead letter: missing_scope 1" in listing
    invoke(env, "dead-letters", "replay", "--reason", "missing_scope")
    replays = invoke(env, "dead-letters", "replays").output
    assert "selection: reasons=missing_scope" in replays
    assert "{" not in replays and "'" not in replays


def test_misspelled_filters_are_refused_with_the_choices(
    env: dict[str, str], one_missing_scope: None
) -> None:
    reason = invoke(env, "dead-letters", "list", "--reason", "missing_scopes")
    assert reason.exit_code == ExitCode.USAGE
    assert "missing_scope" in reason.output and "unauthorized" in reason.output
    typo = invoke(env, "dead-letters", "replay", "--type", "order_creatd")
    assert typo.exit_code == ExitCode.USAGE
    assert "'order_creatd' is no event type" in typo.output
    assert "order_created" in typo.output
    ok = invoke(env, "dead-letters", "list", "--type", "order_created")
    assert ok.exit_code == 0 and "p-0" in ok.output
    for option in ("--since", "--until"):
        when = invoke(env, "dead-letters", "list", option, "yesterday")
        assert when.exit_code == ExitCode.USAGE
        assert f"Invalid value for {option}: 'yesterday': use e.g. 30m" in when.output


def test_purges_and_replays_from_the_command_line_are_audited_with_who_ran_them(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str
) -> None:
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1
    )
    enqueue(settings, events(2))
    drain(settings)  # both dead-lettered: missing_scope
    assert invoke(env, "dead-letters", "replay", "p-0").exit_code == 0
    claimed = {**env, "LOGNAME": "someone-else", "USER": "someone-else"}  # not believed
    purged = invoke(claimed, "dead-letters", "purge", "s-1", "--yes")
    assert purged.exit_code == 0 and "purged 1 dead letter" in purged.output, purged.output

    who = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"
    log = invoke(env, "dead-letters", "replays").output.splitlines()
    assert log[0].endswith(f"purged    purged 1 of 1 selected  selection: ids=s-1  by {who}"), log
    assert "completed" in log[1] and log[1].endswith(f"by {who}"), log
    entries = invoke(env, "dead-letters", "replays", "--json").output.splitlines()
    purged = orjson.loads(entries[0])
    assert (purged["action"], purged["purged"], purged["by"]) == ("purge", 1, who)


def test_the_replays_log_shows_key_checks_asked_for_on_the_console(
    env: dict[str, str], redis_url: str
) -> None:
    """A key check written by the console (it can release a hold) has no selection: the
    command stopped on it with a traceback (KeyError: 'selected')."""
    keys = Settings(_env_file=None, redis_url=redis_url).keys

    async def check() -> None:
        async with aioredis.Redis.from_url(redis_url) as client:
            await replay.audit_key_check(client, keys, ok=True, reason="the key works", by="tok")

    asyncio.run(check())
    shown = invoke(env, "dead-letters", "replays")
    assert shown.exit_code == 0, shown.output
    assert shown.output.rstrip().endswith("key ok      the key works  by tok"), shown.output
    assert "Traceback" not in shown.output


def test_purge_and_replay_name_the_ids_not_found(
    env: dict[str, str], one_missing_scope: None
) -> None:
    purge = invoke(env, "dead-letters", "purge", "p-0", "nope-1", "--yes")
    assert purge.exit_code == 0
    assert "not found: nope-1" in purge.output and "purged 1 dead letter" in purge.output
    replay = invoke(env, "dead-letters", "replay", "nope-2")
    assert "not found: nope-2" in replay.output


def test_exit_codes_have_meanings() -> None:
    from capi.exitcodes import MEANINGS

    output = CliRunner().invoke(cli, ["exit-codes"]).output
    for code in ExitCode:
        assert MEANINGS[code] in output
    assert "10  MISSING_SCOPE        the key lacks ads.third_party_events.write" in output


@pytest.mark.parametrize(
    ("base", "needle"),
    [("/nowhere", "Nothing answers at CAPI_BASE_URL"), ("unreachable", "reachable")],
)
def test_check_key_guidance_speaks_to_check_key(
    env: dict[str, str], sandbox: SandboxThread, base: str, needle: str
) -> None:
    url = "http://127.0.0.1:9" if base == "unreachable" else sandbox.url + base
    result = invoke(
        {
            **env,
            "CAPI_API_KEY": "sk-svcacct-any-key-0000",
            "CAPI_PIXEL_ID": DEFAULT_PIXEL,
            "CAPI_BASE_URL": url,
            "CAPI_PROBE_CONFIRMATIONS": "1",
        },
        "check-key",
    )
    assert result.exit_code in (ExitCode.UNREACHABLE, ExitCode.CONFIG)  # a 404: a setting
    assert needle in result.output
    assert "capi adds /v1/events itself" in result.output
    assert "capi retries this" not in result.output
    assert "is kept in the dead letter" not in result.output


def test_the_default_redis_is_named(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from capi.cli.common import redis_client

    settings = Settings(_env_file=None)  # no CAPI_REDIS_URL anywhere
    with caplog.at_level(logging.WARNING, "capi.producer"):
        SyncProducer.from_settings(settings).close()
    assert "CAPI_REDIS_URL is not set" in caplog.text
    assert "redis://localhost:6379/0" in caplog.text
    asyncio.run(redis_client(settings).aclose())  # never connects
    assert "the default Redis: CAPI_REDIS_URL is not set" in capsys.readouterr().err
    explicit = Settings(_env_file=None, redis_url="redis://elsewhere:6379/0")
    caplog.clear()
    SyncProducer.from_settings(explicit).close()
    asyncio.run(redis_client(explicit).aclose())
    assert not caplog.text and not capsys.readouterr().err


def test_with_two_destinations_the_workers_are_listed_once_after_both(
    env: dict[str, str], tmp_path: Any
) -> None:
    """With two destinations the live workers were printed inside the second one's section,
    between its key and endpoint lines, as if they served only it."""
    from capi.queue import Queue

    path = tmp_path / "destinations.toml"
    path.write_text(
        '[destinations.brand-a]\npixel_id = "p_a"\napi_key_env = "K"\n\n'
        '[destinations.brand-b]\npixel_id = "p_b"\napi_key_env = "K"\n'
    )
    env = {**env, "CAPI_DESTINATIONS_FILE": str(path), "K": "sk-x"}
    settings = Settings(_env_file=None, redis_url=env["CAPI_REDIS_URL"])

    async def beat() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        state = {"state": "idle", "detail": "nothing queued", "destination": "brand-a, brand-b"}
        await Queue(client, settings.keys).heartbeat("w1", int(time.time() * 1000), state)
        await client.aclose()

    asyncio.run(beat())
    text = invoke(env, "status").output
    lines = text.splitlines()
    workers_at = lines.index("workers alive: 1")
    b_at = lines.index("destination brand-b")
    endpoints = [i for i, line in enumerate(lines) if line.startswith("endpoint:")]
    assert workers_at > max(endpoints) > b_at, text
    assert lines[workers_at - 1] == "", text  # a section of its own
