"""The console against hostile input and hostile clients (httpx against a real ``capi
console`` process and a real Redis): commands shown to paste are shell-quoted, numeric
parameters are read strictly, a 500 carries the security headers, identifiers in outside
text are redacted and control characters escaped, a purge deletes exactly what its
confirmation showed, key checks are audited, a slow client is cut off, an expired session
answers JSON, a search by id is bounded, another Host is refused when hosts are set,
cookies are Secure with ``__Host-`` names when the setting says so, and Newer works with a
reason filter."""

from __future__ import annotations

import asyncio
import html
import re
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from capi import destinations
from capi.client import ConversionsClient
from capi.console import auth, views
from capi.console.actions import Actions
from capi.console.answers import SECURITY_HEADERS
from capi.failures import Reason
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_SCOPELESS_KEY
from capi.settings import Settings
from capi.worker.keyguard import KeyGuard
from tests.conftest import free_port
from tests.console_helpers import (
    HTTP_TIMEOUT_S,
    Tokens,
    confirmation,
    csrf_field,
    csrf_of,
    httpx_get,
    httpx_post,
    new_tokens,
    scope_dead_letters,
    seed_dead_letters,
    start_console,
)
from tests.helpers import make_settings, wait_for

HOSTILE_ID = "a$(touch x);b c"
AT_MS = 1_700_000_000_000  # in the past: a purge's cutoff is now


@pytest.fixture
def tokens() -> Tokens:
    return new_tokens()


@pytest.fixture
def seeded(sandbox: SandboxThread, redis_url: str) -> Settings:
    """Dead letters with hostile ids and outside text, in ``default`` and in ``brand-a``."""
    settings = make_settings(sandbox, redis_url)
    seed_dead_letters(settings, [HOSTILE_ID], [Reason.INVALID_EVENT], [AT_MS])
    seed_dead_letters(settings, ["b-1"], [Reason.INVALID_EVENT], [AT_MS], destination="brand-a")
    custom = {
        "type": "custom",
        "custom_event_name": "quote_requested",
        "data": {"type": "custom", "plan_id": "gold", "contact_email": "jane@example.com"},
    }
    seed_dead_letters(settings, ["c-1"], [Reason.INVALID_EVENT], [AT_MS + 1], custom=custom)
    store = redis.Redis.from_url(redis_url)
    keys = settings.keys
    store.hset(settings.keys.for_destination("brand-a").stats, "delivered", 0)
    record = orjson.loads(store.hget(keys.deadletters, "order_created:" + HOSTILE_ID) or b"")
    record.update(
        error_message="user jane@example.com phone +1 415 555 0100 or (415) 555-0101 on "
        "2026-12-06 at 1700000000000 hash " + "ab" * 32 + " \u2028forged\u202eline",
        error_param="user.em\u202eail",
        request_ids={"send": "req_jane@example.com"},
    )
    store.hset(keys.deadletters, "order_created:" + HOSTILE_ID, orjson.dumps(record))
    store.hset(keys.deadletters, "order_created:broken", b"{not json")
    store.zadd(keys.deadletter_index, {"order_created:broken": AT_MS + 2})
    store.close()
    return settings


@pytest.fixture
def console(seeded: Settings, tokens: Tokens, tmp_path: Path) -> str:
    return start_console(seeded, tokens, tmp_path / "console.log")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pasted(page: str) -> str:
    """The ``capi dead-letters show`` command a dead letter's page offers, as text."""
    found = re.search(r'<code id="show-command">(.*?)</code>', page)
    assert found, page[-2000:]
    return html.unescape(found.group(1))


def test_the_show_command_is_shell_quoted_and_names_its_destination(
    console: str, tokens: Tokens
) -> None:
    key = "order_created:" + HOSTILE_ID
    page = httpx_get(
        console + "/d/default/dead-letter", params={"key": key}, headers=bearer(tokens.viewer)
    )
    command = pasted(page.text)
    assert shlex.split(command) == ["capi", "dead-letters", "show", key]
    other = httpx_get(
        console + "/d/brand-a/dead-letter",
        params={"key": "order_created:b-1"},
        headers=bearer(tokens.viewer),
    )
    assert shlex.split(pasted(other.text)) == [
        "capi",
        "dead-letters",
        "show",
        "--destination",
        "brand-a",
        "order_created:b-1",
    ]


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/d/default/dead-letters?at=%C2%B2", "at"),  # '²' passes str.isdigit()
        ("/d/default/dead-letters?at=" + "9" * 5000, "at"),
        ("/d/default/dead-letters?at=-1", "at"),
        ("/d/default/tail.json?after=1-2-3", "after"),
        ("/d/default/tail.json?after=" + "1" * 40 + "-0", "after"),
    ],
)
def test_a_bad_numeric_parameter_is_a_400_naming_it(
    console: str, tokens: Tokens, path: str, param: str
) -> None:
    answer = httpx_get(console + path, headers=bearer(tokens.viewer))
    assert answer.status_code == 400, answer.text[:300]
    assert f"{param} must be" in answer.text


def test_a_500_carries_the_security_headers(
    sandbox: SandboxThread, tokens: Tokens, tmp_path: Path
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every read fails
    url = start_console(make_settings(sandbox, nowhere), tokens, tmp_path / "console.log")
    answer = httpx_get(url + "/", headers=bearer(tokens.viewer))
    assert answer.status_code == 500
    for name, value in SECURITY_HEADERS:
        assert answer.headers.get(name.decode()) == value.decode(), name


def test_outside_text_is_redacted_and_escaped_and_custom_data_masked(
    console: str, tokens: Tokens
) -> None:
    page = httpx_get(
        console + "/d/default/dead-letter",
        params={"key": "order_created:" + HOSTILE_ID},
        headers=bearer(tokens.viewer),
    ).text
    assert "jane@example.com" not in page and "(email hidden)" in page
    assert "415 555 0100" not in page and "555-0101" not in page and "(phone hidden)" in page
    assert "on 2026-12-06 at 1700000000000 hash" in page  # a date and a time stay
    assert "ab" * 32 not in page
    assert "\u2028" not in page and "\u202e" not in page
    assert "\\u2028forged\\u202eline" in page and "user.em\\u202eail" in page
    custom = httpx_get(
        console + "/d/default/dead-letter",
        params={"key": "quote_requested:c-1"},
        headers=bearer(tokens.viewer),
    ).text
    assert "jane@example.com" not in custom
    assert "&#34;contact_email&#34;: &#34;(hidden)&#34;" in custom  # the name, not the value
    assert "gold" in custom  # a plan field is shown


def test_a_destinations_page_redacts_its_held_keys_diagnosis_and_endpoint_error(
    console: str, tokens: Tokens, seeded: Settings
) -> None:
    """Both quote the API (or a proxy): the overview redacts them, the destination's own
    page did not."""
    keys = seeded.keys
    store = redis.Redis.from_url(seeded.redis_url)
    said = "user jane@example.com phone +1 415 555 0100 hash " + "ab" * 32
    store.hset(
        keys.key_state,
        mapping={"state": "held", "reason": "unauthorized", "guidance": f"API said: {said!r}"},
    )
    now_ms = int(time.time() * 1000)
    store.hset(
        keys.endpoint,
        mapping={"failing_since": now_ms, "last_error": f"HTTP 503: {said}", "last_error_ms": 1},
    )
    store.close()
    viewer = bearer(tokens.viewer)
    for path in ("/", "/overview.json", "/d/default"):
        page = httpx_get(console + path, headers=viewer).text
        assert "jane@example.com" not in page and "555 0100" not in page, path
        assert "ab" * 32 not in page, path
        assert "(email hidden)" in page, path
    page = httpx_get(console + "/d/default", headers=viewer).text
    assert "API said: &#39;user (email hidden) phone (phone hidden) hash " in page
    assert "HTTP 503: user (email hidden)" in page


def test_an_unreadable_record_points_to_the_command_line(console: str, tokens: Tokens) -> None:
    page = httpx_get(
        console + "/d/default/dead-letter",
        params={"key": "order_created:broken"},
        headers=bearer(tokens.operator),
    ).text
    assert 'id="unreadable"' in page and "/purge?" not in page
    assert "capi dead-letters purge order_created:broken" in page


def test_a_purge_deletes_what_its_confirmation_showed_or_nothing(
    console: str, tokens: Tokens, seeded: Settings
) -> None:
    operator = bearer(tokens.operator)
    confirm = httpx_get(console + "/d/default/purge?reason=invalid_event", headers=operator).text
    assert 'id="purge-count">2<' in confirm
    form = confirmation(confirm)
    assert int(form["until_ms"]) > AT_MS and form["count"] == "2"
    # one more arrives (dead-lettered now) and one goes, after the confirmation was shown
    seed_dead_letters(seeded, ["late"], [Reason.INVALID_EVENT], [AT_MS - 5])
    store = redis.Redis.from_url(seeded.redis_url)
    changed = httpx_post(console + "/d/default/purge", headers=operator, data=form)
    assert changed.status_code == 409 and "nothing was purged" in changed.text
    assert store.hexists(seeded.keys.deadletters, "order_created:late")
    store.hdel(seeded.keys.deadletters, "order_created:late")
    store.zrem(seeded.keys.deadletter_index, "order_created:late")
    seed_dead_letters(seeded, ["newer"], [Reason.INVALID_EVENT], [int(form["until_ms"]) + 60_000])
    done = httpx_post(console + "/d/default/purge", headers=operator, data=form)
    assert done.status_code == 200 and "purged 2" in done.text
    assert store.hexists(seeded.keys.deadletters, "order_created:newer")  # after the cutoff
    store.close()


def test_a_key_check_from_the_console_is_audited(
    sandbox: SandboxThread, redis_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    held = scope_dead_letters(sandbox, redis_url)
    url = start_console(held, tokens, tmp_path / "console.log")
    operator = bearer(tokens.operator)
    csrf = csrf_of(httpx_get(url + "/", headers=operator).text)
    checked = httpx_post(url + "/d/default/check-key", headers=operator, data={"csrf": csrf})
    assert checked.status_code == 200
    audit = httpx_get(url + "/d/default/audit", headers=operator).text
    row = re.search(r"<td>key check</td><td>(key \w+)</td>.*?<td>([^<]*)</td></tr>", audit, re.S)
    assert row, audit[-1500:]
    assert row.group(1) == "key failing"  # the sandbox key still lacks the scope
    assert row.group(2) == auth.fingerprint(auth.digest(tokens.operator))


def test_a_key_check_passing_with_another_key_than_the_workers_releases_no_hold(
    sandbox: SandboxThread, redis_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    """The console host has the new key, the workers still the old one (a rotation half
    done): the console's check passed and wrote the key state ok, releasing the workers'
    hold, so they sent again with their broken key (and dead-lettered the batches) until
    they confirmed it anew. capi check-key keeps such a hold; so does the console now."""
    held = scope_dead_letters(sandbox, redis_url)  # the workers' key lacks the scope
    store = redis.Redis.from_url(redis_url)
    hold = store.hgetall(held.keys.key_state)
    assert hold[b"state"] == b"held"
    url = start_console(make_settings(sandbox, redis_url), tokens, tmp_path / "new-key.log")
    operator = bearer(tokens.operator)
    csrf = csrf_of(httpx_get(url + "/", headers=operator).text)
    checked = httpx_post(url + "/d/default/check-key", headers=operator, data={"csrf": csrf})
    assert checked.status_code == 200 and "can write events" in checked.text
    assert "not released" in checked.text, checked.text[-1500:]
    assert store.hgetall(held.keys.key_state) == hold  # the workers' hold stands
    sandbox.state.configure(  # the scope is granted: the workers' own key now writes events
        {"conversion_keys": [DEFAULT_KEY, DEFAULT_SCOPELESS_KEY], "scopeless_keys": []}
    )
    url = start_console(held, tokens, tmp_path / "same-key.log")
    csrf = csrf_of(httpx_get(url + "/", headers=operator).text)
    checked = httpx_post(url + "/d/default/check-key", headers=operator, data={"csrf": csrf})
    assert checked.status_code == 200 and "released" in checked.text
    assert store.hget(held.keys.key_state, "state") == b"ok"
    store.close()


def test_an_expired_session_gets_401_json_on_live_endpoints(console: str) -> None:
    for path in ("/overview.json", "/d/default/tail.json", "/jobs/x.json"):
        answer = httpx_get(console + path, cookies={"capi_console": "gone"})
        assert answer.status_code == 401, path
        assert answer.json() == {"error": "session expired: log in again"}
    script = httpx_get(console + "/static/console.js").text
    assert "session expired: log in again" in script and "401" in script


def test_a_search_by_id_looks_only_through_the_newest(
    sandbox: SandboxThread, redis_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url)
    n = views.SEARCH_NEWEST + 5
    ids = [f"s-{i}" for i in range(n)]
    seed_dead_letters(settings, ids, [Reason.INVALID_EVENT] * n, [AT_MS + i for i in range(n)])
    store = redis.Redis.from_url(redis_url)  # the oldest becomes a custom event's record
    raw = store.hget(settings.keys.deadletters, "order_created:s-0") or b""
    store.hdel(settings.keys.deadletters, "order_created:s-0")
    store.zrem(settings.keys.deadletter_index, "order_created:s-0")
    store.hset(settings.keys.deadletters, "quote_requested:s-0", raw)
    store.zadd(settings.keys.deadletter_index, {"quote_requested:s-0": AT_MS - 1})
    store.close()
    url = start_console(settings, tokens, tmp_path / "console.log")
    viewer = bearer(tokens.viewer)
    found = httpx_get(url + "/d/default/dead-letters?id=s-0", headers=viewer).text
    assert f"not found in the newest {views.SEARCH_NEWEST}" in found
    assert "capi dead-letters show" in found
    missing = httpx_get(url + "/d/default/dead-letter?key=s-0", headers=viewer)
    assert missing.status_code == 404 and f"newest {views.SEARCH_NEWEST}" in missing.text


def test_a_client_that_never_finishes_its_headers_is_cut_off(console: str) -> None:
    host, port = console.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S * 3) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: console\r\n")  # and never the blank line
        answer = b""
        while chunk := slow.recv(4096):  # until the server closes (or the socket times out)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_request_for_another_host_is_refused_when_hosts_are_set(
    seeded: Settings, tokens: Tokens, tmp_path: Path
) -> None:
    url = start_console(
        seeded, tokens, tmp_path / "console.log", CAPI_CONSOLE_HOSTS="console.example,127.0.0.1"
    )
    viewer = bearer(tokens.viewer)
    assert httpx_get(url + "/", headers={**viewer, "Host": "console.example"}).status_code == 200
    other = httpx_get(url + "/", headers={**viewer, "Host": "rebound.example"})
    assert other.status_code == 400
    for name, value in SECURITY_HEADERS:
        assert other.headers.get(name.decode()) == value.decode(), name


def test_secure_cookies_setting_marks_cookies_secure_with_host_names(
    seeded: Settings, tokens: Tokens, tmp_path: Path
) -> None:
    url = start_console(
        seeded, tokens, tmp_path / "console.log", CAPI_CONSOLE_SECURE_COOKIES="true"
    )
    form = httpx_get(url + "/login")
    (login_cookie,) = form.headers.get_list("set-cookie")
    assert login_cookie.startswith("__Host-capi_console_login=")
    assert "secure" in login_cookie.lower()
    answer = httpx_post(
        url + "/login",
        headers={"Cookie": login_cookie.split(";")[0]},
        data={"csrf": csrf_field(form.text), "token": tokens.viewer},
    )
    assert answer.status_code == 303
    session = next(c for c in answer.headers.get_list("set-cookie") if "capi_console=" in c)
    assert session.startswith("__Host-capi_console=")
    flags = [f.strip().lower() for f in session.split(";")]
    assert "secure" in flags and "path=/" in flags
    assert not any(f.startswith("domain") for f in flags)
    value = session.split(";")[0].split("=", 1)[1]
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=url) as client:
        page = client.get("/", headers={"Cookie": f"__Host-capi_console={value}"})
        assert page.status_code == 200


def test_newer_leads_back_to_the_page_before_with_a_reason_filter(
    sandbox: SandboxThread, redis_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url)
    n = 130  # every other one missing_scope: 65, a page of 50 and one of 15
    reasons = [Reason.MISSING_SCOPE if i % 2 else Reason.INVALID_EVENT for i in range(n)]
    seed_dead_letters(
        settings, [f"r-{i}" for i in range(n)], reasons, [AT_MS + i for i in range(n)]
    )
    url = start_console(settings, tokens, tmp_path / "console.log")
    viewer = bearer(tokens.viewer)

    def visit(path: str) -> tuple[list[str], dict[str, str]]:
        page = httpx_get(url + path, headers=viewer).text
        ids = re.findall(r"key=order_created%3A([\w-]+)\">", page)
        links = re.findall(r'href="([^"]+)" id="(\w+)-page"', page)
        return ids, {name: html.unescape(href) for href, name in links}

    first, links = visit("/d/default/dead-letters?reason=missing_scope")
    assert first == [f"r-{i}" for i in range(129, 29, -2)] and "previous" not in links
    second, links = visit(links["next"])
    assert second == [f"r-{i}" for i in range(29, 0, -2)]
    again, links = visit(links["previous"])
    assert again == first


def test_a_hold_the_workers_confirm_while_the_console_checks_the_key_stands(
    sandbox: SandboxThread, redis_url: str
) -> None:
    """The destination is not held when the console's check starts; while its probe waits
    on a slow endpoint, the workers confirm a key problem and hold it. The check passing
    wrote the key state ok over their hold (the workers resumed on a key they had just
    found broken); now their hold stands and the check says so."""
    slow = SandboxThread().start()  # the console's endpoint: every answer 3 s late
    slow.state.configure({"faults": [{"kind": "latency", "every": 1, "latency_ms": 3000}]})
    settings = make_settings(
        slow, redis_url, request_timeout_s=10, claim_idle_s=30, probe_confirmations=1
    )
    keys = settings.keys.for_destination("default")
    workers = destinations.load(
        make_settings(sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=1)
    )["default"]

    async def scenario() -> dict[str, Any]:
        store = aioredis.Redis.from_url(redis_url)
        try:
            checking = asyncio.create_task(
                Actions(settings, store).check_key(destinations.load(settings)["default"], "t")
            )
            # the console's probe is on its way
            await asyncio.to_thread(wait_for, lambda: slow.state.requests, what="the probe")
            async with ConversionsClient.for_destination(workers) as client:
                guard = KeyGuard(client, store, keys, api_key=workers.api_key, confirmations=1)
                failed = await guard.check()
                assert not failed.ok
                await guard.hold(failed)
            assert not checking.done()  # the hold came while the check probed
            return await checking
        finally:
            await store.aclose()

    try:
        checked = asyncio.run(scenario())
    finally:
        slow.stop()
    assert checked["ok"] and checked["hold"] == "again", checked
    state = redis.Redis.from_url(redis_url).hgetall(keys.key_state)
    assert state[b"state"] == b"held" and state[b"reason"] == b"missing_scope", state
