"""Shared by the console's tests: a real ``capi console`` process, tokens, dead letters."""

from __future__ import annotations

import html
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from capi import deadletters
from capi.console import auth
from capi.events import prepare, purchase
from capi.failures import Reason
from capi.guidance import diagnose
from capi.queue import Entry
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_SCOPELESS_KEY
from capi.settings import Settings
from tests.helpers import _plain, drain, enqueue, events, make_settings, spawn, wait_for

HTTP_TIMEOUT_S = 30  # generous: a loaded machine answers slowly, never wrongly


def httpx_get(url: str, **kw: Any) -> httpx.Response:
    """``httpx.get`` with :data:`HTTP_TIMEOUT_S`."""
    return httpx.get(url, timeout=HTTP_TIMEOUT_S, **kw)


def httpx_post(url: str, **kw: Any) -> httpx.Response:
    """``httpx.post`` with :data:`HTTP_TIMEOUT_S`."""
    return httpx.post(url, timeout=HTTP_TIMEOUT_S, **kw)


@dataclass(frozen=True)
class Tokens:
    """An operator's and a viewer's console token, and the setting that grants both."""

    operator: str
    viewer: str

    @property
    def setting(self) -> str:
        """CAPI_CONSOLE_TOKENS_SHA256 for both."""
        return f"operator:{auth.digest(self.operator)},viewer:{auth.digest(self.viewer)}"


def new_tokens() -> Tokens:
    return Tokens(auth.new_token(), auth.new_token())


def start_console(settings: Settings, tokens: Tokens, log: Path, **env: str) -> str:
    """``capi console --port 0`` configured by ``settings``; its base URL."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
    full.update(CAPI_CONFIG_FILE=os.devnull, CAPI_CONSOLE_TOKENS_SHA256=tokens.setting, **env)
    with log.open("wb") as out:
        proc = spawn(
            [sys.executable, "-m", "workers.cli", "console", "--port", "0"],
            env=full,
            stdout=out,
            stderr=out,
        )
    found: list[str] = []

    def started() -> bool:
        found[:] = re.findall(r"capi console on (http://\S+)", log.read_text())
        return bool(found) or proc.poll() is not None

    wait_for(started, timeout_s=60, what="capi console to start")
    assert found, log.read_text()
    url = found[0]
    wait_for(lambda: _answers(url), timeout_s=60, what="capi console to answer")
    return url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def csrf_field(page: str) -> str:
    """The CSRF field of a page's form."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


def login(client: httpx.Client, token: str) -> httpx.Response:
    """Log in through the form as a browser does (the form's CSRF cookie and field)."""
    form = client.get("/login")
    return client.post("/login", data={"csrf": csrf_field(form.text), "token": token})


def confirmation(page: str) -> dict[str, str]:
    """The fields of a purge's confirmation form (the cutoff and count it showed, the
    CSRF token), ticked."""
    fields = re.findall(r'name="(\w+)" value="([^"]*)"', page)
    assert any(name == "until_ms" for name, _ in fields), page[-1500:]
    return {name: html.unescape(value) for name, value in fields}


def csrf_of(page: str) -> str:
    """The CSRF token a page carries."""
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


def scope_dead_letters(
    sandbox: SandboxThread, redis_url: str, evts: list[dict[str, Any]] | None = None
) -> Settings:
    """Dead letters for a key that lacks the scope (the key is then held); the settings
    that made them (their key is the scopeless one)."""
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1
    )
    enqueue(settings, evts if evts is not None else events(2))
    drain(settings)
    return settings


def seed_dead_letters(
    settings: Settings,
    ids: list[str],
    reasons: list[Reason],
    at_ms: list[int],
    destination: str = "default",
    custom: dict[str, Any] | None = None,
) -> None:
    """Dead letters as a worker leaves them (``deadletters.build``), one per id, written
    in pipelines of 5,000; purchases, or custom events with the fields of ``custom``."""
    keys = settings.keys.for_destination(destination)
    client = redis.Redis.from_url(settings.redis_url)
    rows = list(zip(ids, reasons, at_ms, strict=True))
    for start in range(0, len(rows), 5000):
        pipe = client.pipeline(transaction=False)
        for event_id, reason, when in rows[start : start + 5000]:
            base = purchase(event_id, amount=1, currency="USD", source_url="https://s.example/t")
            event = prepare({**base, **(custom or {})})
            entry = Entry(b"0-1", event.json, event.id, event.timestamp_ms)
            record = deadletters.build(
                entry,
                reason=reason,
                guidance=diagnose(reason).text,
                error=None,
                key_fingerprint="…0001 (sha256:00000000)",
                pixel_id="pix",
                now_ms=when,
                attempted=True,
                destination=destination,
            )
            pipe.hset(keys.deadletters, record.key, record.to_json())
            pipe.zadd(keys.deadletter_index, {record.key: when})
        pipe.execute()
    client.close()


def stored_hashes(settings: Settings, destination: str = "default") -> set[str]:
    """Every identifier hash the stored dead letters of a destination hold."""
    client = redis.Redis.from_url(settings.redis_url)
    blob = b"".join(client.hvals(settings.keys.for_destination(destination).deadletters))
    client.close()
    return set(re.findall(r"[0-9a-f]{64}", blob.decode()))
