"""capi.web: the oppref cookie middlewares and event_fields(), and docs/attribution.md's
FastAPI, Flask and Django shops run as written, driven by a real headless Chromium (Debian's
``chromium`` and ``chromium-driver``, which .ci/run installs) against a real Redis, with
the events delivered to the sandbox."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capi import web
from capi.events import prepare, purchase
from capi.sandbox import SandboxThread
from tests.conftest import free_port
from tests.helpers import drain, http_get, make_settings, terminate, wait_for

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "attribution.md"


def scope(
    path: str = "/buy",
    query: bytes = b"",
    headers: dict[str, str] | None = None,
    client: str = "198.51.100.7",
) -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": "https",
        "path": path,
        "root_path": "",
        "query_string": query,
        "headers": [
            (k.encode(), v.encode()) for k, v in {"host": "shop.example", **(headers or {})}.items()
        ],
        "client": (client, 50000),
    }


def test_event_fields_from_an_asgi_request() -> None:
    fields = web.event_fields(
        scope(
            query=b"a=1&oppref=from%20url",
            headers={"user-agent": "UA/1", "cookie": "x=1; __oppref=from-cookie; __obref=ob.1"},
        )
    )
    assert fields == {
        "source_url": "https://shop.example/buy",
        "oppref": "from url",
        "user": {"ip_address": "198.51.100.7", "user_agent": "UA/1"},  # no obref: no consent
    }
    with_consent = web.event_fields(
        scope(headers={"cookie": "__oppref=c%2B1; __obref=ob.1"}), consent=True
    )
    assert with_consent["oppref"] == "c+1" and with_consent["user"]["obref"] == "ob.1"


def test_x_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    forged = {"x-forwarded-for": "203.0.113.66", "x-forwarded-host": "evil.example"}
    untrusted = web.event_fields(scope(headers=forged))
    assert untrusted["user"]["ip_address"] == "198.51.100.7"
    assert untrusted["source_url"] == "https://shop.example/buy"
    chain = {"x-forwarded-for": "203.0.113.66, 192.0.2.10, 10.0.0.5", "x-forwarded-proto": "http"}
    trusted = web.event_fields(
        scope(headers=chain, client="10.0.0.2"), trusted_proxies=["10.0.0.0/8"]
    )
    assert trusted["user"]["ip_address"] == "192.0.2.10"  # the right-most untrusted hop
    assert trusted["source_url"] == "http://shop.example/buy"


def test_a_trusted_proxy_seen_through_a_dual_stack_socket_is_trusted() -> None:
    # An app server listening on an IPv6 socket (uvicorn --host ::) sees its IPv4 proxy as
    # ::ffff:10.0.0.2: that is 10.0.0.2, in the trusted 10.0.0.0/8. It was not believed, so
    # every event carried the proxy's address and the scheme and host behind the proxy.
    chain = {"x-forwarded-for": "203.0.113.66", "x-forwarded-proto": "http"}
    fields = web.event_fields(
        scope(headers=chain, client="::ffff:10.0.0.2"), trusted_proxies=["10.0.0.0/8"]
    )
    assert fields["user"]["ip_address"] == "203.0.113.66"
    assert fields["source_url"] == "http://shop.example/buy"
    hop = {"x-forwarded-for": "203.0.113.66, ::ffff:10.0.0.5"}  # a proxy that writes it so
    fields = web.event_fields(scope(headers=hop, client="10.0.0.2"), trusted_proxies=["10.0.0.0/8"])
    assert fields["user"]["ip_address"] == "203.0.113.66"


def test_event_fields_from_a_wsgi_environ_make_a_valid_event() -> None:
    environ = {
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "127.0.0.1:8000",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/caf\xc3\xa9",
        "QUERY_STRING": "",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_USER_AGENT": "UA/2",
        "HTTP_COOKIE": "__oppref=abc123",
    }
    fields = web.event_fields(environ)
    assert fields["source_url"] == "http://127.0.0.1:8000/caf%C3%A9"
    event = prepare(purchase("w-1", value="1.00", currency="EUR", **fields))
    assert event.event.oppref == "abc123" and event.event.user is not None
    assert event.event.user.user_agent == "UA/2"


def test_the_middlewares_set_the_cookie_only_on_a_landing() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: Any) -> None:
        sent.append(message)

    middleware = web.OpprefMiddleware(app, max_age_s=60)
    asyncio.run(middleware(scope(query=b"oppref=a;b"), None, send))  # type: ignore[arg-type]
    asyncio.run(middleware(scope(), None, send))  # type: ignore[arg-type]
    assert sent[0]["headers"] == [
        (b"set-cookie", b"__oppref=a%3Bb; Max-Age=60; Path=/; SameSite=Lax; Secure")
    ]
    assert sent[1]["headers"] == []
    started: list[Any] = []
    wsgi = web.OpprefWsgiMiddleware(lambda env, start: start("200 OK", []) or [b""])
    wsgi({"QUERY_STRING": "oppref=x"}, lambda *a: started.append(a))
    assert started[0][1] == [("Set-Cookie", "__oppref=x; Max-Age=2592000; Path=/; SameSite=Lax")]


# -- the documentation's shops, in a real browser --------------------------------------------


def example(name: str) -> str:
    """The python block of docs/attribution.md that starts with ``# {name}``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(f"# {name}")]
    return block


WSGI_SERVE = (
    "import sys, wsgiref.simple_server as s; sys.path.insert(0, '.');"
    "app = __import__(sys.argv[1]).{attr};"
    "s.make_server('127.0.0.1', int(sys.argv[2]), app).serve_forever()"
)
SERVERS = {
    "shop_fastapi.py": lambda mod, port: [
        "-m",
        "uvicorn",
        f"{mod}:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ],
    "shop_flask.py": lambda mod, port: ["-c", WSGI_SERVE.format(attr="app"), mod, str(port)],
    "shop_django.py": lambda mod, port: [
        "-c",
        WSGI_SERVE.format(attr="application"),
        mod,
        str(port),
    ],
}


@pytest.fixture
def shop_server(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> str:
        (tmp_path / name).write_text(example(name))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update(CAPI_REDIS_URL=redis_url, CAPI_CONFIG_FILE=os.devnull)
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *SERVERS[name](name[:-3], port)],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: proc.poll() is not None or http_get(url + "/")[0] == 200,
            what=f"{name} to answer",
        )
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        return url

    yield start
    for proc in procs:
        terminate(proc)


@pytest.mark.parametrize("name", list(SERVERS))
def test_a_shop_in_chromium_delivers_the_click_id_and_user_agent(
    name: str, browser: Any, shop_server: Any, redis_url: str, sandbox: SandboxThread
) -> None:
    from selenium.webdriver.common.by import By

    url = shop_server(name)
    browser.get(url + "/?oppref=abc123")
    browser.find_element(By.ID, "product").click()
    wait_for(lambda: browser.current_url == url + "/product", what="the product page")
    browser.find_element(By.ID, "buy").click()
    wait_for(lambda: browser.find_elements(By.ID, "thanks"), what="the thank-you page")
    agent = browser.execute_script("return navigator.userAgent")
    drain(make_settings(sandbox, redis_url))
    (event,) = sandbox.state.recent_events()
    assert event["oppref"] == "abc123"
    assert event["user"]["user_agent"] == agent
    assert event["source_url"] == url + "/buy"  # no query, no fragment
    assert event["data"]["amount"] == 12999
    assert event["user"]["emails_sha256"] and "obref" not in event["user"]
