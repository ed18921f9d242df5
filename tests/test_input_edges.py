"""Smaller input edges found by the outside review: each is refused (or made to match) where
it enters, not after it has cost a batch (real ``capi`` commands, a real ``capi serve``, a
real Redis, an endpoint on loopback)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from capi.events import signup
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.helpers import _plain, capi, make_settings
from tests.intake_helpers import IntakeProcess, start_intake


@pytest.fixture
def intake(tmp_path: Path, redis_url: str) -> Iterator[IntakeProcess]:
    server = start_intake(tmp_path, redis_url)
    yield server
    server.stop()


def queued(redis_url: str) -> list[dict[str, Any]]:
    keys = Settings(_env_file=None, redis_url=redis_url).keys.for_destination("default")
    with redis.Redis.from_url(redis_url) as client:
        return [orjson.loads(f[b"e"]) for _, f in client.xrange(keys.stream)]


def refused_fields(answer: dict[str, Any]) -> list[str]:
    return [e["field"] for r in answer["results"] for e in r["errors"]]


def warned_fields(answer: dict[str, Any]) -> list[str]:
    return [w["field"] for r in answer["results"] for w in r.get("warnings", [])]


def test_a_blank_user_agent_never_reaches_a_batch(intake: IntakeProcess, redis_url: str) -> None:
    # It used to pass enqueue and then fail its whole batch at the API. Now it is left out
    # at enqueue with a warning (the event still counts), as every invalid optional
    # identifier is; CAPI_STRICT_IDENTIFIERS=true refuses the event instead.
    event = signup("ua-1", email="a@example.com", source_url="https://shop.example/")
    event["user"]["user_agent"] = "   "
    answer = intake.post([event]).json()
    assert answer["queued"] == 1 and warned_fields(answer) == ["user.user_agent"]
    [stored] = queued(redis_url)
    assert "user_agent" not in stored["user"]


def test_a_key_given_twice_is_refused_by_the_intake_as_by_capi_enqueue(
    intake: IntakeProcess, redis_url: str
) -> None:
    event = orjson.dumps(signup("dup-1", email="a@example.com", source_url="https://s.example/"))
    twice = event[:-1] + b',"id":"dup-2"}'  # the same key again: which id was meant?
    line = intake.post(content=twice + b"\n", content_type="application/x-ndjson")
    assert line.status_code == 200
    (result,) = line.json()["results"]
    assert result["status"] == "refused" and "'id' twice" in result["errors"][0]["rule"]
    body = intake.post(content=b'{"events": [' + twice + b"]}")
    assert body.status_code == 400 and "'id' twice" in body.json()["error"]["message"]
    assert queued(redis_url) == []


@pytest.mark.parametrize(
    "url", ["https://:443/", "https://shop example.com/", "https://shop.example:99999/x"]
)
def test_a_source_url_without_a_usable_host_is_refused(
    intake: IntakeProcess, redis_url: str, url: str
) -> None:
    answer = intake.post([signup("url-1", email="a@example.com", source_url=url)]).json()
    assert answer["refused"] == 1 and refused_fields(answer) == ["source_url"]
    assert queued(redis_url) == []


@pytest.mark.parametrize("hidden", ["\ufeff", "\u200b", "\u200d", "\u2060"])
def test_an_invisible_character_in_an_email_is_dropped_before_hashing(
    intake: IntakeProcess, redis_url: str, hidden: str
) -> None:
    email = f"{hidden}ada{hidden}@example.com"
    answer = intake.post([signup("em-1", email=email, source_url="https://s.example/")]).json()
    assert answer["queued"] == 1
    (event,) = queued(redis_url)
    assert event["user"]["emails_sha256"] == [hashlib.sha256(b"ada@example.com").hexdigest()]


def test_a_bidi_character_in_an_email_is_never_hashed(
    intake: IntakeProcess, redis_url: str
) -> None:
    email = "ada\u202emoc.elpmaxe@example.com"
    answer = intake.post([signup("em-2", email=email, source_url="https://s.example/")]).json()
    assert answer["queued"] == 1 and warned_fields(answer) == ["user.email[0]"]
    [stored] = queued(redis_url)
    assert "emails_sha256" not in stored.get("user", {})


@pytest.mark.parametrize("control", ["\x00", "\x01", "\x1b", "\x7f"])
def test_an_ascii_control_character_in_an_email_is_never_hashed(
    intake: IntakeProcess, redis_url: str, control: str
) -> None:
    """Refused like a bidi character: it was checked for only in an email that held a
    non-ASCII character, so "ada\\x00@example.com" was hashed and sent, a hash that
    matches no one, without a warning."""
    email = f"ada{control}@example.com"
    answer = intake.post([signup("em-3", email=email, source_url="https://s.example/")]).json()
    assert answer["queued"] == 1 and warned_fields(answer) == ["user.email[0]"]
    [stored] = queued(redis_url)
    assert "emails_sha256" not in stored.get("user", {})


@pytest.mark.parametrize("field", ["email", "postal_codes"])
def test_thousands_of_invalid_identifiers_are_named_twenty_and_counted(
    intake: IntakeProcess, redis_url: str, field: str
) -> None:
    """Each invalid identifier left out was named, with no cap as problems have: an event
    with 20,000 invalid emails (80 KB) was answered with 1.7 MB of warnings, and 3.9 MB of
    such events with 84 MB, the server growing by 360 MB to build it."""
    event = signup("wide-1", email="ada@example.com", source_url="https://s.example/")
    event["user"][field] = [f"nobody{i}!" for i in range(5000)]  # neither email nor postcode
    if field == "email":
        event["user"]["email"].insert(0, "ada@example.com")
    answer = intake.post([event]).json()
    assert answer["queued"] == 1
    (result,) = answer["results"]
    assert len(result["warnings"]) == 21, result["warnings"][-3:]
    assert result["warnings"][-1] == {"field": "(event)", "rule": "and 4980 more warnings"}
    [stored] = queued(redis_url)
    assert stored["user"]["emails_sha256"] == [hashlib.sha256(b"ada@example.com").hexdigest()]


def test_a_base_url_with_userinfo_is_refused(sandbox: SandboxThread, redis_url: str) -> None:
    settings = make_settings(sandbox, redis_url, probe_confirmations=1)
    base = sandbox.url.replace("http://", "http://someone@")
    result = capi_with(settings, {"CAPI_BASE_URL": base}, "check-key")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "CAPI_BASE_URL" in result.stderr and "Basic auth" in result.stderr


def test_a_destinations_base_url_with_userinfo_is_refused(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(
        '[destinations.a]\npixel_id = "pix_a"\napi_key_env = "K"\n'
        'base_url = "https://user:pw@bzr.example.com"\n'
    )
    settings = Settings(_env_file=None, redis_url=redis_url, destinations_file=path)
    result = capi(settings, "destinations")
    assert result.returncode == 3 and "base_url" in result.stderr and "Basic auth" in result.stderr


def test_plain_http_to_another_host_is_warned_about(sandbox: SandboxThread, redis_url: str) -> None:
    settings = make_settings(sandbox, redis_url, probe_confirmations=1, request_timeout_s=0.5)
    # 192.0.2.1 is TEST-NET-1: never a real host; the warning comes before any connection.
    result = capi_with(settings, {"CAPI_BASE_URL": "http://192.0.2.1:9"}, "check-key")
    assert "unencrypted" in result.stdout + result.stderr
    quiet = capi(settings, "check-key")  # the sandbox on loopback: no warning
    assert quiet.returncode == 0 and "unencrypted" not in quiet.stdout + quiet.stderr


def capi_with(settings: Settings, env: dict[str, str], *args: str) -> Any:
    """``capi`` configured by ``settings``, with ``env`` on top (values settings refuse)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
    full.update(env, CAPI_CONFIG_FILE=os.devnull)
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
