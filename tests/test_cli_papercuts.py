"""Papercuts a new operator meets: --version, exit codes of replay, enqueue --dry-run,
emptying a queue, unknown CAPI_* names, keys named in config/capi.env, and the commands
that must work while the destinations file is broken."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

import capi
from capi.exitcodes import ExitCode
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY
from tests.helpers import drain, enqueue, events, make_settings, spawn, wait_for
from workers.cli import cli


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str, sandbox: SandboxThread) -> dict[str, str]:
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    return {
        "CAPI_REDIS_URL": redis_url,
        "CAPI_CONFIG_FILE": os.devnull,
        "CAPI_API_KEY": DEFAULT_KEY,
        "CAPI_PIXEL_ID": DEFAULT_PIXEL,
        "CAPI_BASE_URL": sandbox.url,
    }


def invoke(env: dict[str, str], *args: str, **kw: Any) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, **kw)


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"capi {version('capi')}"
    assert capi.__version__ == version("capi")


@pytest.fixture
def scope_dead_letters(env: dict[str, str], sandbox: SandboxThread, redis_url: str) -> None:
    """Two dead letters (missing_scope): the key lacked the scope."""
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1
    )
    enqueue(settings, events(2))
    drain(settings)


def test_replay_dry_run_exits_non_zero_when_the_api_would_reject(
    env: dict[str, str], scope_dead_letters: None
) -> None:
    # A key still lacking the scope is the key's failure, not the events': non-zero, with
    # check-key's exit code, and the events reported as not checked rather than rejected.
    still_broken = {**env, "CAPI_API_KEY": DEFAULT_SCOPELESS_KEY}
    result = invoke(still_broken, "dead-letters", "replay", "--all", "--dry-run")
    assert result.exit_code == ExitCode.MISSING_SCOPE, result.output
    assert "2 of the selected events could not be checked" in result.output
    as_json = invoke(still_broken, "dead-letters", "replay", "--all", "--dry-run", "--json")
    assert as_json.exit_code == ExitCode.MISSING_SCOPE
    fixed = invoke(env, "dead-letters", "replay", "--all", "--dry-run")
    assert fixed.exit_code == 0, fixed.output
    assert "dry run: 2 would be accepted, 0 rejected" in fixed.output


def test_replay_of_an_unknown_id_exits_non_zero(
    env: dict[str, str], scope_dead_letters: None
) -> None:
    result = invoke(env, "dead-letters", "replay", "no-such-id")
    assert result.exit_code == ExitCode.NOT_FOUND, result.output
    assert "1 id named matched no dead letter: no-such-id" in result.output
    dry = invoke(env, "dead-letters", "replay", "no-such-id", "--dry-run")
    assert dry.exit_code == ExitCode.NOT_FOUND
    # The ids found are replayed all the same; the exit code still says one was not.
    mixed = invoke(env, "dead-letters", "replay", "p-0", "no-such-id")
    assert mixed.exit_code == ExitCode.NOT_FOUND
    assert "replayed 1 of 1 selected" in mixed.output
    show = invoke(env, "dead-letters", "show", "no-such-id")
    assert show.exit_code == ExitCode.NOT_FOUND


def _jsonl(evts: list[dict[str, Any]], *extra: str) -> str:
    import json

    return "".join(json.dumps(e) + "\n" for e in evts) + "".join(x + "\n" for x in extra)


def test_enqueue_dry_run_reports_each_line_and_queues_nothing(
    env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    from tests.conftest import free_port

    file = tmp_path / "events.jsonl"
    file.write_text(_jsonl(events(2), '{"id": "x", "type": "order_created"}', "not json"))
    result = invoke(env, "enqueue", "--dry-run", str(file))
    assert result.exit_code == ExitCode.REFUSED, result.output
    assert "line 3: " in result.output and "line 4: " in result.output
    assert "dry run: 2 valid, refused 2; nothing was queued" in result.output
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    # Redis is not contacted at all: a dry run works with no Redis there.
    away = {**env, "CAPI_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    clean = tmp_path / "clean.jsonl"
    clean.write_text(_jsonl(events(3)))
    ok = invoke(away, "enqueue", "--dry-run", "--json", str(clean))
    assert ok.exit_code == 0, ok.output
    assert '"valid":3' in ok.output and '"queued":0' in ok.output


def test_a_file_saved_with_a_byte_order_mark_is_read_and_a_stray_one_is_named(
    env: dict[str, str], tmp_path: Path
) -> None:
    first, second = _jsonl(events(2)).splitlines()
    file = tmp_path / "events.jsonl"
    file.write_bytes(b"\xef\xbb\xbf" + f"{first}\n\ufeff{second}\n".encode())
    result = invoke(env, "enqueue", "--dry-run", str(file))
    assert "dry run: 1 valid, refused 1" in result.output, result.output
    assert "line 2: event refused: (line): starts with a byte order mark (U+FEFF)" in result.output


def test_a_config_file_line_that_cannot_be_read_is_named_with_its_file_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "capi.env"
    config.write_text(f"CAPI_REDIS_URL={env['CAPI_REDIS_URL']}\nthis is not a setting\n")
    result = run_capi({**env, "CAPI_CONFIG_FILE": str(config)}, "destinations")
    assert result.returncode == 0, result.stderr
    said = f"warning: {config} line 2 is ignored: it is not NAME=value"
    assert result.stderr.count(said) == 1, result.stderr
    assert "python-dotenv" not in result.stderr


def test_queue_purge_empties_the_queue_but_keeps_dead_letters_and_in_flight(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str
) -> None:
    import asyncio

    from capi.queue import Queue
    from capi.status import destination_status

    broken = make_settings(sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1)
    enqueue(broken, events(1, prefix="dl-"))
    drain(broken)  # one dead letter
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(10))

    async def take_some() -> None:  # as a worker would: 3 in flight, 2 scheduled for retry
        client = settings.async_redis()
        queue = Queue(client, settings.keys)
        await queue.ensure_group()
        await queue.read("w:0", 3)
        later = await queue.read("w:1", 2)
        await queue.schedule_retry(later, 2**42, {"reason": "network"}, 1)
        await client.aclose()

    def status() -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            client = settings.async_redis()
            try:
                return await destination_status(client, settings.keys)
            finally:
                await client.aclose()

        return asyncio.run(go())

    asyncio.run(take_some())
    before = status()
    assert (before["queued"], before["in_flight"], before["retry_batches_scheduled"]) == (5, 3, 1)
    declined = invoke(env, "queue", "purge", input="n\n")
    assert "Delete 5 queued events and 1 scheduled retry batch of destination 'default'?" in (
        declined.output
    )
    assert "Nothing deleted." in declined.output and status()["queued"] == 5
    result = invoke(env, "queue", "purge", "--yes")
    assert result.exit_code == 0, result.output
    assert "purged 5 queued events and 2 events scheduled for retry from default" in result.output
    assert "3 events in flight were left to finish" in result.output
    after = status()
    assert (after["queued"], after["in_flight"], after["retry_batches_scheduled"]) == (0, 3, 0)
    assert after["dead_letters"] == 1 and after["counters"]["purged"] == 7
    again = invoke(env, "queue", "purge", "--yes")
    assert again.exit_code == 0 and "Nothing queued for default." in again.output
    # The purged events are no longer duplicates: the same ones may be enqueued again.
    from capi.producer import SyncProducer

    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(events(10))
    assert (report.queued, report.duplicates) == (7, 3)  # the 3 in flight still count
    assert "capi queue purge --destination" in invoke(env, "queue", "--help").output


def run_capi(
    env: dict[str, str], *args: str, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``capi`` in a process of its own, with exactly these CAPI_* variables."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update(env)
    full["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=full,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unknown_capi_variables_are_warned_about_with_the_closest_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    typo = run_capi({**env, "CAPI_REDIS_URI": "redis://elsewhere:6379/0"}, "status")
    assert typo.returncode == 0, typo.stderr
    assert (
        "warning: CAPI_REDIS_URI (in the environment) is not a capi setting and is ignored; "
        "did you mean CAPI_REDIS_URL?" in typo.stderr
    )
    config = tmp_path / "capi.env"
    config.write_text(f"CAPI_REDIS_URL={env['CAPI_REDIS_URL']}\nCAPI_BATCH_SIZ=10\n")
    in_file = run_capi({**env, "CAPI_CONFIG_FILE": str(config)}, "destinations")
    assert in_file.returncode == 0, in_file.stderr
    assert f"CAPI_BATCH_SIZ (in {config}) is not a capi setting" in in_file.stderr
    assert "did you mean CAPI_BATCH_SIZE?" in in_file.stderr
    # The worker says it too (and a variable a destinations file names is no typo).
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "p"\napi_key_env = "CAPI_KEY_BRAND_A"\n')
    # It says so as it starts: read its output until then (whatever its key check does).
    log = tmp_path / "worker.log"
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update(
        env,
        CAPI_DESTINATIONS_FILE=str(dests),
        CAPI_KEY_BRAND_A=DEFAULT_KEY,
        CAPI_PIXEL_ID="p",
        CAPI_CONCURENCY="4",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    with log.open("w") as out:
        proc = spawn(
            [sys.executable, "-m", "workers.cli", "worker", "--burst"],
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    wait_for(
        lambda: "did you mean CAPI_CONCURRENCY?" in log.read_text() or proc.poll() is not None,
        60,
        "the worker's warning",
    )
    proc.kill()
    proc.wait(10)
    worker = subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())
    assert "CAPI_CONCURENCY (in the environment) is not a capi setting" in worker.stderr
    assert "did you mean CAPI_CONCURRENCY?" in worker.stderr
    assert "CAPI_KEY_BRAND_A" not in worker.stderr


def test_a_key_variable_the_destinations_file_does_not_name_is_no_typo_of_a_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A destinations file whose api_key_env holds the key itself (refused) names no
    variable: CAPI_KEY_BRAND_A was warned about as 'did you mean CAPI_RETRY_BASE_S?'."""
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "p"\napi_key_env = "sk-pasted-0001"\n')
    extra = {"CAPI_DESTINATIONS_FILE": str(dests), "CAPI_KEY_BRAND_A": DEFAULT_KEY}
    result = run_capi({**env, **extra}, "check-key")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "did you mean" not in result.stderr
    assert "CAPI_KEY_BRAND_A (in the environment) is named by no api_key_env of a" in result.stderr


def test_a_setting_without_its_prefix_in_the_config_file_is_warned_about(
    env: dict[str, str], tmp_path: Path
) -> None:
    """api_key=... or PIXEL_ID=... in config/capi.env was ignored without a word (and
    check-key then said CAPI_API_KEY must be set, though the file 'set' it)."""
    config = tmp_path / "capi.env"
    config.write_text(f"CAPI_REDIS_URL={env['CAPI_REDIS_URL']}\napi_key={DEFAULT_KEY}\n")
    result = run_capi({**env, "CAPI_CONFIG_FILE": str(config)}, "status")
    assert result.returncode == 0, result.stderr
    assert (
        f"api_key (in {config}) is not read: capi's settings carry the CAPI_ prefix; "
        "did you mean CAPI_API_KEY?" in result.stderr
    )
    assert DEFAULT_KEY not in result.stderr


def test_api_key_env_is_read_from_the_config_file_too(
    env: dict[str, str], sandbox: SandboxThread, tmp_path: Path
) -> None:
    sandbox.state.pixels.add("pix-a")
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "pix-a"\napi_key_env = "KEY_A"\n')
    config = tmp_path / "capi.env"
    config.write_text(f"KEY_A={DEFAULT_KEY}\n")
    base = {k: v for k, v in env.items() if k not in ("CAPI_API_KEY", "CAPI_PIXEL_ID")}
    ok = run_capi(
        {**base, "CAPI_CONFIG_FILE": str(config), "CAPI_DESTINATIONS_FILE": str(dests)},
        "check-key",
    )
    assert ok.returncode == 0, ok.stderr
    assert "can write events to pixel 'pix-a'" in ok.stdout
    assert DEFAULT_KEY not in ok.stdout + ok.stderr
    # Unset in both: the message says where it was looked for.
    config.write_text("")
    missing = run_capi(
        {**base, "CAPI_CONFIG_FILE": str(config), "CAPI_DESTINATIONS_FILE": str(dests)},
        "check-key",
    )
    assert missing.returncode == ExitCode.CONFIG
    assert f"KEY_A, which is not set (looked for in the environment or {config})" in (
        missing.stderr
    )


def test_status_names_a_destination_left_behind_by_a_destinations_file(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    enqueue(make_settings(sandbox, redis_url), events(27))  # queued under "default"
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "p"\napi_key_env = "CAPI_API_KEY"\n')
    with_file = {**env, "CAPI_DESTINATIONS_FILE": str(dests)}
    result = invoke(with_file, "status")
    assert result.exit_code == 0, result.output
    assert "destination default: NOT CONFIGURED" in result.output
    assert "it still holds 27 queued" in result.output
    assert "add [destinations.default] to the destinations file" in result.output
    assert "capi queue purge --destination default" in result.output
    as_json = invoke(with_file, "status", "--json")
    assert json.loads(as_json.output)["stranded"]["default"]["queued"] == 27
    listed = invoke(with_file, "destinations").output
    assert "default" in listed and "removed" in listed
    # The way out it names works: the stranded queue can be emptied.
    purged = invoke(with_file, "queue", "purge", "--destination", "default", "--yes")
    assert "purged 27 queued events" in purged.output, purged.output
    assert "NOT CONFIGURED" not in invoke(with_file, "status").output


def test_status_runs_with_a_broken_destinations_file_and_shows_its_error_on_top(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    enqueue(make_settings(sandbox, redis_url), events(4))
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "p"\napi_key_env = \n')  # no value
    broken = {**env, "CAPI_DESTINATIONS_FILE": str(dests)}
    result = invoke(broken, "status")
    assert result.exit_code == ExitCode.CONFIG
    first = result.output.splitlines()[0]
    assert first.startswith("destinations file: BROKEN:") and "is not valid TOML" in first
    assert "destination default" in result.output and "queued:        4" in result.output
    assert "Traceback" not in result.output
    as_json = json.loads(invoke(broken, "status", "--json").output)
    assert "is not valid TOML" in as_json["destinations_file_error"]
    assert as_json["queued"] == 4


def test_destinations_lists_what_redis_holds_under_a_broken_destinations_file(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    enqueue(make_settings(sandbox, redis_url), events(4))
    dests = tmp_path / "destinations.toml"
    dests.write_text('[destinations.brand-a]\npixel_id = "p"\napi_key_env = \n')  # no value
    broken = run_capi({**env, "CAPI_DESTINATIONS_FILE": str(dests)}, "destinations")
    assert broken.returncode == ExitCode.CONFIG
    assert broken.stderr.startswith("error: the destinations file is broken:"), broken.stderr
    assert "is not valid TOML" in broken.stderr and "Traceback" not in broken.stderr
    assert re.search(r"^default\s.*\s4\s", broken.stdout, re.M), broken.stdout
    rows = [
        json.loads(line)
        for line in run_capi(
            {**env, "CAPI_DESTINATIONS_FILE": str(dests)}, "destinations", "--json"
        ).stdout.splitlines()
    ]
    assert [(r["name"], r["queued"], r["configured"]) for r in rows] == [("default", 4, None)]
    assert rows[0]["key_state"] == "unchecked"  # ok | held | unchecked: it said "unknown"


def test_destinations_fits_80_columns_without_cutting_names_or_pixels(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    enqueue(make_settings(sandbox, redis_url), events(3))  # left under "default"
    dests = tmp_path / "destinations.toml"
    dests.write_text(
        '[destinations.brand-a]\npixel_id = "pix_brand_a_000000001"\napi_key_env = "KEY_A"\n'
        '[destinations.brand-nw]\npixel_id = "sandbox-pixel-00000001"\napi_key_env = "KEY_B"\n'
    )
    result = run_capi(
        {
            **env,
            "CAPI_DESTINATIONS_FILE": str(dests),
            "KEY_A": DEFAULT_KEY,
            "KEY_B": DEFAULT_SCOPELESS_KEY,
            "COLUMNS": "80",
        },
        "destinations",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    for name, pixel in (
        ("brand-a", "pix_brand_a_000000001"),
        ("brand-nw", "sandbox-pixel-00000001"),
    ):
        assert any(name in line and pixel in line for line in lines), result.stdout
    assert "  default: not in the destinations file: add it back to send its events," in (
        result.stdout
    )
    assert "capi queue purge --destination default" in result.stdout


def test_the_curl_of_dead_letters_show_works_in_a_fresh_shell_with_the_key_in_the_file(
    env: dict[str, str], sandbox: SandboxThread, scope_dead_letters: None, tmp_path: Path
) -> None:
    config = tmp_path / "capi.env"
    config.write_text(
        f'CAPI_API_KEY="{DEFAULT_KEY}"\nCAPI_PIXEL_ID={DEFAULT_PIXEL}\n'
        f"CAPI_BASE_URL={sandbox.url}\nCAPI_REDIS_URL={env['CAPI_REDIS_URL']}\n"
    )
    shown = run_capi({"CAPI_CONFIG_FILE": str(config)}, "dead-letters", "show", "p-0")
    assert shown.returncode == 0, shown.stderr
    assert DEFAULT_KEY not in shown.stdout + shown.stderr
    curl = shown.stdout.split("never shown):\n", 1)[1]
    fresh = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    answer = subprocess.run(
        ["bash", "-c", curl], env=fresh, capture_output=True, text=True, timeout=30, check=False
    )
    assert answer.stdout.startswith("HTTP/1.1 200"), answer.stdout + answer.stderr


@pytest.fixture
def two_destinations(
    env: dict[str, str], sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> dict[str, str]:
    """brand-a (a good key) and brand-b (a key lacking the scope, so two dead letters);
    the environment of a capi command for them."""
    from capi.destinations import Destination
    from capi.producer import SyncProducer

    dests = tmp_path / "destinations.toml"
    dests.write_text(
        f'[destinations.brand-a]\npixel_id = "{DEFAULT_PIXEL}"\napi_key_env = "KEY_A"\n'
        f'[destinations.brand-b]\npixel_id = "{DEFAULT_PIXEL}"\napi_key_env = "KEY_B"\n'
    )
    settings = make_settings(sandbox, redis_url, destinations_file=dests, probe_confirmations=1)
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue_many(events(2), destination="brand-b").queued == 2
    b = Destination("brand-b", DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY, "$KEY_B", sandbox.url)
    drain(settings, destination=b)
    return {
        **env,
        "CAPI_DESTINATIONS_FILE": str(dests),
        "KEY_A": DEFAULT_KEY,
        "KEY_B": DEFAULT_SCOPELESS_KEY,
    }


def test_support_bundle_covers_every_destination(two_destinations: dict[str, str]) -> None:
    multi = two_destinations
    result = invoke(multi, "support-bundle")
    assert result.exit_code == 0, result.output
    a_part, b_part = result.output.split("destination:         brand-b")
    assert "destination:         brand-a" in a_part and "No dead letters recorded." in a_part
    assert "- event p-0 (order_created): missing_scope, HTTP 401" in b_part
    assert "No dead letters recorded." not in b_part
    assert "key fingerprint:     …0002" in b_part
    assert DEFAULT_SCOPELESS_KEY not in result.output and DEFAULT_KEY not in result.output
    only_a = invoke(multi, "support-bundle", "--destination", "brand-a").output
    assert "brand-b" not in only_a


def test_intake_token_write_grants_every_token_in_the_one_env_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    from capi.intake import tokens
    from capi.settings import Settings

    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    config = tmp_path / "capi.env"
    old = "a" * 64  # granted by the old recipe, whose second `>>` line hid it
    config.write_text(f"CAPI_REDIS_URL={redis_url}\nCAPI_INTAKE_TOKENS_SHA256={old}\n")
    config.chmod(0o600)
    env = {"CAPI_CONFIG_FILE": str(config)}
    made = []
    for i in range(2):
        output = tmp_path / f"token-{i}.json"
        result = run_capi(env, "intake-token", "--write", "--output", str(output))
        assert result.returncode == 0, result.stderr
        # capi serve follows the config file (tests/test_intake_guard.py): no restart
        assert "capi serve picks it up by itself" in result.stderr
        assert "restart" not in result.stderr
        assert oct(output.stat().st_mode & 0o777) == "0o600"
        made.append(json.loads(output.read_text())["token"])
        assert made[-1] not in result.stdout + result.stderr  # only in the file
    lines = [x for x in config.read_text().splitlines() if "INTAKE_TOKENS" in x]
    assert len(lines) == 1
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    grants = tokens.read_grants(Settings.load(config))
    assert set(grants) == {old, *map(tokens.digest, made)}


def test_intake_token_write_lands_in_the_destinations_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capi.intake import tokens
    from capi.settings import Settings

    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    dests = tmp_path / "destinations.toml"
    dests.write_text(
        "# our pixels\n"
        '[destinations.brand-a]\npixel_id = "pa"  # the shop\napi_key_env = "KEY_A"\n\n'
        '[destinations.brand-b]\npixel_id = "pb"\napi_key_env = "KEY_B"\n'
    )
    env = {"CAPI_CONFIG_FILE": os.devnull, "CAPI_DESTINATIONS_FILE": str(dests)}
    result = run_capi(env, "intake-token", "--destination", "brand-a", "--write", "--json")
    assert result.returncode == 0, result.stderr
    token = json.loads(result.stdout)["token"]
    settings = Settings.load(os.devnull, destinations_file=dests)
    assert tokens.read_grants(settings) == {tokens.digest(token): frozenset({"brand-a"})}
    assert "# our pixels" in dests.read_text() and '"pa"  # the shop' in dests.read_text()
    # Without --write, the instructions name the table (and warn against the file's end).
    shown = run_capi(env, "intake-token", "--destination", "brand-a")
    assert "in the [destinations.brand-a] table of" in shown.stdout
    assert "not at the end of the file" in shown.stdout


def test_intake_token_json_is_git_ignored() -> None:
    root = Path(__file__).resolve().parents[1]
    check = subprocess.run(
        ["git", "check-ignore", "-q", "intake-token.json"], cwd=root, check=False
    )
    assert check.returncode == 0


# Product section 7: --destination on status, check-key, worker, every dead-letters command
# (and enqueue); the help says so and the option does what it says.
DESTINATION_COMMANDS = [
    ("status",),
    ("check-key",),
    ("worker", "--burst"),
    ("enqueue",),
    ("dead-letters", "list"),
    ("dead-letters", "show", "p-0"),
    ("dead-letters", "replay", "--all"),
    ("dead-letters", "replays"),
    ("dead-letters", "export"),
    ("dead-letters", "purge", "--all", "--yes"),
    ("support-bundle",),
]


@pytest.mark.parametrize("command", DESTINATION_COMMANDS, ids=" ".join)
def test_every_command_product_names_takes_destination(
    two_destinations: dict[str, str], command: tuple[str, ...]
) -> None:
    words = [w for w in command if not w.startswith("-") and w != "p-0"]
    assert "--destination" in invoke(two_destinations, *words, "--help").output
    result = invoke(two_destinations, *command, "--destination", "nope", input="")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "'nope' is not configured" in result.output


def test_show_and_replays_keep_to_the_destination_named(two_destinations: dict[str, str]) -> None:
    multi = two_destinations
    absent = invoke(multi, "dead-letters", "show", "p-0", "--destination", "brand-a")
    assert absent.exit_code == ExitCode.NOT_FOUND
    shown = invoke(multi, "dead-letters", "show", "p-0", "--destination", "brand-b")
    assert shown.exit_code == 0 and "destination:      brand-b" in shown.output
    assert invoke(multi, "dead-letters", "replay", "--all").exit_code == 0
    assert (
        "No replays yet."
        in invoke(multi, "dead-letters", "replays", "--destination", "brand-a").output
    )
    assert (
        "completed" in invoke(multi, "dead-letters", "replays", "--destination", "brand-b").output
    )


class _NotTheApi(http.server.BaseHTTPRequestHandler):
    """Some other service's 401, as a CAPI_BASE_URL naming the wrong server gets it."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b'{"detail": "Unauthorized"}'
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_401_from_a_server_that_is_not_the_api_points_at_the_base_url(
    env: dict[str, str], sandbox: SandboxThread
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTheApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        wrong = invoke({**env, "CAPI_BASE_URL": url}, "check-key")
    finally:
        server.shutdown()
        server.server_close()
    assert wrong.exit_code != 0
    assert "1. This answer is not in the API's error format" in wrong.output, wrong.output
    assert "Check CAPI_BASE_URL" in wrong.output
    # The API's own 401 (its error envelope) blames the key, not the URL.
    sandbox.state.conversion_keys.discard(DEFAULT_KEY)
    real = invoke(env, "check-key")
    assert "[unauthorized]" in real.output, real.output
    assert "error format" not in real.output


def test_the_apis_plain_text_rbac_denial_does_not_blame_the_base_url(
    env: dict[str, str], sandbox: SandboxThread
) -> None:
    # The API itself answers "RBAC: access denied" as plain text (contract, section 7.4):
    # that is no sign that CAPI_BASE_URL names another server.
    sandbox.state.faults.append(Fault("rbac", every=1))
    result = invoke(env, "check-key")
    assert result.exit_code != 0
    assert "[access_denied]" in result.output, result.output
    assert "1. This is usually transient on the platform side" in result.output, result.output
    assert "error format" not in result.output
    assert "Check CAPI_BASE_URL" not in result.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing_scope:evry=7", "missing_scope: 'evry' is no fault option; they are: rate, every"),
        ("missing_scope:every", "missing_scope: every must be a whole number, got ''"),
        ("rate_limit:rate=often", "rate_limit: rate must be a number, got 'often'"),
    ],
)
def test_a_bad_fault_option_is_named_with_its_rule(spec: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["sandbox", "--port", "0", "--fault", spec])
    assert result.exit_code == ExitCode.USAGE
    assert f"Invalid value for --fault: {message}" in result.output
    assert "__init__" not in result.output and "literal" not in result.output


def test_the_suite_run_beside_a_destinations_file_says_so_instead_of_failing_everywhere(
    tmp_path: Path,
) -> None:
    """A newcomer who followed README.md ("Several pixels": config/destinations.toml) and
    then ran the tests saw hundreds of failures ("destination: name one: this deployment
    has several"): every capi a test starts reads config/destinations.toml from the current
    directory. The run stops at once and says which file, and what to do."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "destinations.toml").write_text(
        '[destinations.brand-a]\npixel_id = "p"\napi_key_env = "K"\n'
        '[destinations.brand-b]\npixel_id = "q"\napi_key_env = "K"\n'
    )
    root = Path(__file__).resolve().parents[1]
    test = "tests/test_cli_output.py::test_status_labels_current_and_all_time_dead_letters"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPI_", "PYTEST_"))}
    args = ["-q", "-n", "0", "-p", "no:cacheprovider", f"--rootdir={root}", str(root / test)]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=tmp_path,
        env={**env, "K": "sk-x"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "config/destinations.toml" in output and "mv config/destinations.toml" in output, output
    assert "name one" not in output, output
