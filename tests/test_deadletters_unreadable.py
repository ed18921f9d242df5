"""One unreadable dead letter record never breaks the dead-letter commands or the prune job."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from click.testing import Result

from capi.sandbox import SandboxThread
from capi.settings import Settings
from capi.worker.sender import Sender
from tests.helpers import dead_letters, doom, drain, enqueue, events, make_settings
from tests.test_deadletters_cli import cli_env, cli_run

BAD_KEY = "order_created:deep-1"


def deep_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.fixture
def broken(redis_url: str, sandbox: SandboxThread) -> Settings:
    """Two real dead letters, and one stored by an older capi with 300-deep custom data."""
    settings = make_settings(sandbox, redis_url)
    evts = events(4)
    enqueue(settings, evts)
    doom(settings, event_ids={"p-0", "s-1"})
    drain(settings)
    good = dead_letters(settings)["p-0"]
    raw = orjson.dumps(good | {"key": BAD_KEY, "id": "deep-1", "event": {}})
    raw = raw.replace(b'"event":{}', b'"event":' + deep_json(300))
    client = redis.Redis.from_url(redis_url)
    client.hset(settings.keys.deadletters, BAD_KEY, raw)
    client.zadd(settings.keys.deadletter_index, {BAD_KEY: int(time.time() * 1000)})
    client.close()
    return settings


def skipped(result: Result) -> None:
    assert result.exit_code == 0, result.output
    assert f"warning: skipped dead letter {BAD_KEY}: it cannot be read" in result.stderr
    assert "Traceback" not in result.output


def test_list_export_and_support_bundle_skip_it_and_say_so(broken: Settings) -> None:
    result = cli_run(broken, "dead-letters", "list", "--json")
    skipped(result)
    assert {orjson.loads(row)["id"] for row in result.stdout.splitlines()} == {"p-0", "s-1"}
    skipped(cli_run(broken, "dead-letters", "list"))
    result = cli_run(broken, "dead-letters", "export")
    skipped(result)
    assert len(result.stdout.splitlines()) == 2
    result = cli_run(broken, "support-bundle")
    skipped(result)
    assert "event p-0" in result.stdout


def test_show_prints_it_as_stored_and_others_as_usual(broken: Settings) -> None:
    result = cli_run(broken, "dead-letters", "show", "deep-1")
    assert result.exit_code == 0
    assert f"dead letter {BAD_KEY} cannot be read" in result.stderr
    assert deep_json(300).decode() in result.stdout
    assert "id:               p-0" in cli_run(broken, "dead-letters", "show", "p-0").stdout


def test_replay_and_purge_go_on_and_purge_removes_it_only_when_named(
    broken: Settings, sandbox: SandboxThread
) -> None:
    result = cli_run(broken, "dead-letters", "replay", "--all")
    skipped(result)
    assert "replayed 2 of 2 selected" in result.stdout
    client = redis.Redis.from_url(broken.redis_url)
    assert client.hkeys(broken.keys.deadletters) == [BAD_KEY.encode()]
    drain(broken)  # the doomed two are refused again
    assert set(dead_letters(broken)) == {"p-0", "s-1", "deep-1"}
    skipped(cli_run(broken, "dead-letters", "purge", "--all", "--yes"))
    assert client.hexists(broken.keys.deadletters, BAD_KEY)
    result = cli_run(broken, "dead-letters", "purge", BAD_KEY, "--yes")
    assert result.exit_code == 0 and "purged 1 dead letter\n" in result.stdout
    assert not client.hexists(broken.keys.deadletters, BAD_KEY)


def test_the_prune_job_skips_it_and_logs_it(
    broken: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from capi.worker.housekeeping import prune_dead_letters

    async def go() -> None:
        sender = Sender.from_settings(broken)
        try:
            await prune_dead_letters(sender, int(time.time() * 1000))
        finally:
            await sender.aclose()

    caplog.set_level(logging.WARNING)
    asyncio.run(go())
    assert "skipped 1 dead letters that cannot be read" in caplog.text
    assert BAD_KEY in caplog.text


def test_the_commands_it_suggests_are_quoted_for_the_shell(
    broken: Settings, tmp_path: Path
) -> None:
    planted = tmp_path / "planted"
    key = f"order_created:$(touch {planted})"
    client = redis.Redis.from_url(broken.redis_url)
    client.hset(broken.keys.deadletters, key, b"{not json")
    client.zadd(broken.keys.deadletter_index, {key: int(time.time() * 1000)})
    client.close()
    result = cli_run(broken, "dead-letters", "list")
    show = re.search(r"`(capi dead-letters show [^`]+)`", result.stderr)
    assert show, result.stderr
    env = {**os.environ, **cli_env(broken)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    pasted = subprocess.run(
        ["bash", "-c", show.group(1)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not planted.exists()
    assert "{not json" in pasted.stdout, pasted.stdout + pasted.stderr
