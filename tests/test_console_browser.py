"""capi console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
against a real ``capi console``, Redis, worker and sandbox: an operator finds a destination
held for a missing scope, reads a dead letter's guidance, fixes the key, dry-runs and
replays it (delivered exactly once, audited with the token's fingerprint); a viewer is
offered nothing and refused; every page reachable holds no key, token, email or hash.
The run saves its screenshots in tests/output/screenshots/ (git-ignored); with
``CAPI_UPDATE_SCREENSHOTS=1`` it also rewrites those docs/console.md and README.md show."""

from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import redis

from capi import destinations
from capi.console import auth
from capi.events import purchase
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL, DEFAULT_SCOPELESS_KEY
from tests.console_helpers import (
    HTTP_TIMEOUT_S,
    login,
    new_tokens,
    start_console,
    stored_hashes,
)
from tests.helpers import drain, events, make_settings, start_worker, stop_worker, wait_for

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "img"  # the committed screenshots the docs show
RUN_SHOTS = ROOT / "tests" / "output" / "screenshots"  # each run's, git-ignored


def screenshot(browser: Any, name: str) -> None:
    """Save the page as ``name`` in :data:`RUN_SHOTS`, and in :data:`SHOTS` when
    ``CAPI_UPDATE_SCREENSHOTS=1`` (so that a test run leaves the tree as it was)."""
    places = [RUN_SHOTS] + ([SHOTS] if os.environ.get("CAPI_UPDATE_SCREENSHOTS") == "1" else [])
    for place in places:
        place.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(place / name))


HOSTILE_ID = "<script>alert(1)</script>"


KEYS = {"CAPI_KEY_BRAND_A": DEFAULT_KEY, "CAPI_KEY_BRAND_B": DEFAULT_SCOPELESS_KEY}


@pytest.fixture
def scene(
    sandbox: SandboxThread, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Two destinations: brand-a delivered some events (recent outcomes, match coverage);
    brand-b's key lacks the scope, so it is held with three dead letters (one with a
    hostile id). A console on them."""
    file = tmp_path / "destinations.toml"
    file.write_text(
        "".join(
            f'[destinations.{name}]\npixel_id = "{DEFAULT_PIXEL}"\n'
            f'api_key_env = "{env}"\nbase_url = "{sandbox.url}"\n\n'
            for name, env in (("brand-a", "CAPI_KEY_BRAND_A"), ("brand-b", "CAPI_KEY_BRAND_B"))
        )
    )
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(sandbox, redis_url, destinations_file=file, probe_confirmations=1)
    configured = destinations.load(settings)
    hostile = purchase(
        HOSTILE_ID,
        amount=1,
        currency="USD",
        email="hostile@example.com",
        source_url="https://shop.example/thanks",
    )
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue_many(events(6, prefix="ok-"), "brand-a").ok
        assert producer.enqueue_many([*events(2), hostile], "brand-b").ok
    for name in ("brand-a", "brand-b"):
        drain(settings, destination=configured[name])
    worker = start_worker(settings, **KEYS)  # serves brand-a, holds brand-b
    states = redis.Redis.from_url(redis_url)
    wait_for(
        lambda: states.hget(settings.keys.for_destination("brand-a").key_state, "state") == b"ok",
        timeout_s=60,
        what="the worker's key check of brand-a",
    )
    states.close()
    tokens = new_tokens()
    url = start_console(settings, tokens, tmp_path / "console.log", **KEYS)
    return {"settings": settings, "tokens": tokens, "url": url, "worker": worker}


def browser_login(browser: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/login")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.find_elements(By.ID, "overview"), what="the overview", timeout_s=60)


def text_of(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.ID, element_id)
    return str(found[0].text) if found else ""


def delivered_row(browser: Any, event_id: str) -> bool:
    """Whether the recent outcomes list the event as delivered."""
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "#tail tbody tr")
    return any(row.text.split()[1:2] == [event_id] and " delivered " in row.text for row in rows)


def test_an_operator_fixes_a_held_key_and_replays_its_dead_letter_once(
    browser: Any, scene: dict[str, Any], sandbox: SandboxThread
) -> None:
    from selenium.webdriver.common.by import By

    url, tokens = scene["url"], scene["tokens"]
    browser.set_window_size(1360, 820)
    browser_login(browser, url, tokens.operator)
    healthy = browser.find_element(By.CSS_SELECTOR, 'tr[data-name="brand-a"]')
    assert healthy.find_element(By.CSS_SELECTOR, '[data-f="key_state"]').text == "ok"
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-name="brand-b"]')
    assert row.find_element(By.CSS_SELECTOR, '[data-f="key_state"]').text == "held"
    assert "missing_scope" in row.text
    diagnosis = browser.find_element(By.CSS_SELECTOR, 'tr[data-diagnosis="brand-b"]')
    assert "lacks the scope ads.third_party_events.write" in diagnosis.text
    wait_for(
        lambda: "live, updated" in text_of(browser, "live-state"),
        what="a live update",
        timeout_s=60,
    )
    screenshot(browser, "console-overview.png")

    browser.find_element(By.LINK_TEXT, "3").click()  # the dead letters column
    wait_for(
        lambda: browser.find_elements(By.ID, "dead-letters"), what="the dead letters", timeout_s=60
    )
    assert HOSTILE_ID in browser.find_element(By.ID, "dead-letters").text  # as text
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # console.js alone
    browser.find_element(By.LINK_TEXT, "p-0").click()
    wait_for(
        lambda: text_of(browser, "event-id") == "p-0", what="the dead letter p-0", timeout_s=60
    )
    assert text_of(browser, "reason").startswith("missing_scope")
    guidance = text_of(browser, "guidance")
    assert "Create a fresh Conversion Key" in guidance and "lacks the scope" in guidance
    assert "req_sbx_" in text_of(browser, "request-ids")
    assert '"Authorization: Bearer $CAPI_KEY_BRAND_B"' in text_of(browser, "curl")  # not the key
    screenshot(browser, "console-dead-letter.png")

    browser.find_element(By.ID, "dry-run").click()  # the key still lacks the scope
    wait_for(
        lambda: browser.find_elements(By.ID, "dry-run-summary"), what="the dry run", timeout_s=60
    )
    # A key failure says nothing about the event: not checked, not a rejection.
    assert text_of(browser, "dry-run-summary").startswith(
        "0 would be accepted, 0 rejected, 1 not checked"
    )
    assert "not checked" in text_of(browser, "verdicts")
    assert not browser.find_elements(By.ID, "replay")

    sandbox.state.configure(  # the scope is granted: the same key now writes events
        {"conversion_keys": [DEFAULT_KEY, DEFAULT_SCOPELESS_KEY], "scopeless_keys": []}
    )
    browser.get(url + "/d/brand-b")
    browser.find_element(By.ID, "check-key").click()
    wait_for(
        lambda: "can write events" in text_of(browser, "key-check"),
        what="the key check",
        timeout_s=60,
    )
    outcomes = browser.current_window_handle
    browser.switch_to.new_window("tab")  # the destination's page, left open
    browser.get(url + "/d/brand-b")
    live = browser.current_window_handle
    assert not delivered_row(browser, "p-0")
    browser.switch_to.window(outcomes)
    browser.get(url + "/d/brand-b/dead-letter?key=order_created%3Ap-0")
    browser.find_element(By.ID, "dry-run").click()
    wait_for(lambda: browser.find_elements(By.ID, "replay"), what="the replay button", timeout_s=60)
    assert text_of(browser, "dry-run-summary").startswith("1 would be accepted, 0 rejected")
    browser.find_element(By.ID, "replay").click()
    wait_for(
        lambda: "completed: 1 of 1; replayed 1" in text_of(browser, "job-state"),
        timeout_s=60,
        what="the replay to complete",
    )
    wait_for(lambda: sandbox.state.delivered_ids()["p-0"] >= 1, timeout_s=60, what="delivery")
    browser.switch_to.window(live)  # the delivery appeared there without a reload
    wait_for(lambda: delivered_row(browser, "p-0"), timeout_s=60, what="the live delivery")
    stop_worker(scene["worker"])
    assert sandbox.state.delivered_ids()["p-0"] == 1  # exactly once
    assert sandbox.state.delivered_ids()["s-1"] == 0  # not chosen: still a dead letter

    browser.get(url + "/d/brand-b/audit")
    audit = browser.find_element(By.ID, "audit").text
    fingerprint = auth.fingerprint(auth.digest(tokens.operator))
    completed = [line for line in audit.splitlines() if "completed" in line]
    assert completed and fingerprint in completed[0] and "replayed 1" in completed[0]


def test_a_viewer_is_offered_no_change_and_refused_one(browser: Any, scene: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    url, tokens = scene["url"], scene["tokens"]
    browser_login(browser, url, tokens.viewer)
    browser.get(url + "/d/brand-b/dead-letter?key=order_created%3Ap-0")
    wait_for(lambda: text_of(browser, "event-id") == "p-0", what="the dead letter", timeout_s=60)
    for offered in ("dry-run", "purge"):
        assert not browser.find_elements(By.ID, offered), offered
    browser.get(url + "/d/brand-b")
    assert browser.find_elements(By.ID, "key-state") and not browser.find_elements(
        By.ID, "check-key"
    )
    post = (
        "const done = arguments[arguments.length - 1];"
        "const csrf = document.querySelector('meta[name=csrf-token]').content;"
        "fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'},"
        " body: arguments[1] + '&csrf=' + encodeURIComponent(csrf)})"
        ".then(r => done(r.status), e => done(String(e)));"
    )
    for path, body in (
        ("/d/brand-b/replay/dry-run", "key=order_created%3Ap-0"),
        ("/d/brand-b/purge", "key=order_created%3Ap-0&confirm=yes"),
        ("/d/brand-b/check-key", ""),
    ):
        assert browser.execute_async_script(post, url + path, body) == 403, path
    browser.get(url + "/d/brand-b/purge?key=order_created%3Ap-0")
    assert "403" in browser.find_element(By.TAG_NAME, "h1").text


def test_no_page_the_crawl_reaches_holds_a_key_token_email_or_hash(
    scene: dict[str, Any],
) -> None:
    url, tokens, settings = scene["url"], scene["tokens"], scene["settings"]
    secrets = [
        DEFAULT_KEY,
        DEFAULT_SCOPELESS_KEY,
        tokens.operator,
        tokens.viewer,
        auth.digest(tokens.operator),
        auth.digest(tokens.viewer),
        *stored_hashes(settings, "brand-b"),
    ]
    assert len(secrets) > 6  # the dead letters hold hashed emails
    for token in (tokens.operator, tokens.viewer):
        with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=url) as client:
            login(client, token)
            pages = crawl(client)
        assert sum("/dead-letter?key=" in where for where in pages) == 3, list(pages)
        assert {"/", "/d/brand-a", "/d/brand-b/audit", "/d/brand-a/tail.json"} <= set(pages)
        for where, body in pages.items():
            for secret in secrets:
                assert secret not in body, (where, secret[:12])
            assert not re.search(r"[\w.+-]+@[\w-]+\.\w+", body), where
            assert "<script>alert" not in body, where


def crawl(client: httpx.Client, limit: int = 300) -> dict[str, str]:
    """Every page reachable from the overview by links (and the JSON the pages poll)."""
    seen: dict[str, str] = {}
    todo = deque(["/"])
    while todo and len(seen) < limit:
        path = todo.popleft()
        if path in seen or "/logout" in path:
            continue
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code)
        seen[path] = answer.text
        for found in re.findall(r'(?:href|data-live)="([^"#]+)"', answer.text):
            link = found.replace("&amp;", "&")
            target = urljoin(client.base_url.join(path).raw_path.decode(), link)
            parts = urlsplit(target)
            if parts.netloc or parts.path.startswith("/static/"):
                continue
            todo.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    return seen


def test_screenshots_are_where_the_docs_show_them() -> None:
    for doc in (ROOT / "README.md", ROOT / "docs" / "console.md"):
        for name in ("console-overview.png", "console-dead-letter.png"):
            assert name in doc.read_text(), (doc, name)
            assert (SHOTS / name).is_file()
