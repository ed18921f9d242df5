"""capi console over HTTP (httpx against a real ``capi console`` process and a real Redis):
security headers, cookie flags, the login rate limit, CSRF, roles, Bearer tokens, and the
audit of a purge."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import redis

from capi.console import auth
from capi.console.answers import SECURITY_HEADERS, STATIC_HEADERS
from capi.failures import Reason
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.console_helpers import (
    HTTP_TIMEOUT_S,
    Tokens,
    confirmation,
    csrf_field,
    csrf_of,
    httpx_get,
    httpx_post,
    login,
    new_tokens,
    scope_dead_letters,
    seed_dead_letters,
    start_console,
)
from tests.helpers import capi, make_settings


@pytest.fixture
def tokens() -> Tokens:
    return new_tokens()


@pytest.fixture
def held(sandbox: SandboxThread, redis_url: str) -> Settings:
    """Two missing_scope dead letters (p-0, s-1), the key held."""
    return scope_dead_letters(sandbox, redis_url)


@pytest.fixture
def console(held: Settings, tokens: Tokens, tmp_path: Path) -> str:
    return start_console(held, tokens, tmp_path / "console.log")


def test_healthz_needs_no_token_and_pages_need_one(console: str) -> None:
    assert httpx_get(console + "/healthz").text == "ok"
    for path in ("/", "/d/default", "/d/default/dead-letters"):
        answer = httpx_get(console + path)
        assert answer.status_code == 303 and answer.headers["location"] == "/login", path
    live = httpx_get(console + "/overview.json")  # JSON for the live page, never a redirect
    assert live.status_code == 401 and live.json() == {"error": "session expired: log in again"}
    wrong = httpx_get(console + "/", headers={"Authorization": "Bearer capi_console_wrong"})
    assert wrong.status_code == 401
    assert "one added since needs the console restarted" in wrong.text  # a new token's fate


def test_every_answer_carries_the_security_headers(console: str, tokens: Tokens) -> None:
    bearer = {"Authorization": f"Bearer {tokens.viewer}"}
    answers = [
        httpx_get(console + "/healthz"),
        httpx_get(console + "/login"),
        httpx_get(console + "/", headers=bearer),
        httpx_get(console + "/d/nowhere", headers=bearer),
        httpx_get(console + "/static/console.js"),
        httpx_post(console + "/d/default/purge", headers=bearer),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 200, 403]
    for answer in answers:
        expected = STATIC_HEADERS if answer.url.path.startswith("/static/") else SECURITY_HEADERS
        for name, value in expected:
            assert answer.headers[name.decode()] == value.decode(), (answer.url, name)
    # the script may be kept, and is asked for again only if it changed
    script = answers[4]
    assert (
        script.headers["cache-control"] == "no-cache"
        and answers[2].headers["cache-control"] == "no-store"
    )
    again = httpx_get(
        console + "/static/console.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content
    csp = answers[0].headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    page = answers[2].text
    assert "<script>" not in page and 'src="/static/console.js"' in page  # no inline script


def test_login_sets_a_strict_session_cookie_that_is_not_the_token(
    console: str, tokens: Tokens, redis_url: str
) -> None:
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=console) as client:
        answer = login(client, tokens.operator)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("capi_console=")
        )
        flags = [f.strip().lower() for f in cookie.split(";")]
        assert "httponly" in flags and "samesite=strict" in flags
        assert f"max-age={auth.SESSION_TTL_S}" in flags
        assert "secure" not in flags  # plain HTTP, no trusted proxy
        value = cookie.split(";")[0].split("=", 1)[1]
        assert tokens.operator not in cookie and auth.digest(tokens.operator) not in cookie
        assert client.get("/").status_code == 200
    stored = redis.Redis.from_url(redis_url)
    sessions = list(stored.scan_iter("capi:console:session:*"))
    assert len(sessions) == 1 and value.encode() not in sessions[0]
    assert tokens.operator.encode() not in (stored.get(sessions[0]) or b"")
    stored.close()


def test_secure_cookie_behind_a_trusted_https_proxy_only(
    held: Settings, tokens: Tokens, tmp_path: Path
) -> None:
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    untrusted = start_console(held, tokens, tmp_path / "a.log")
    trusted = start_console(held, tokens, tmp_path / "b.log", CAPI_TRUSTED_PROXIES="127.0.0.1")
    for url, secure in ((untrusted, False), (trusted, True)):
        form = httpx_get(url + "/login", headers=proxied)
        (login_cookie,) = form.headers.get_list("set-cookie")
        assert ("secure" in login_cookie.lower()) == secure
        csrf = csrf_field(form.text)
        answer = httpx_post(  # the cookie by hand: httpx keeps Secure cookies from plain HTTP
            url + "/login",
            headers={**proxied, "Cookie": login_cookie.split(";")[0]},
            data={"csrf": csrf, "token": tokens.viewer},
        )
        cookie = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith("capi_console=")
        )
        assert ("secure" in cookie.lower()) == secure, (url, cookie)


def test_failed_logins_are_limited_per_client_and_a_valid_token_gets_through(
    console: str, tokens: Tokens
) -> None:
    wrong = {"Authorization": "Bearer capi_console_not-this-one"}
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=console) as client:
        answers = [login(client, tokens.viewer).status_code for _ in range(6)]
        assert answers == [303] * 6  # successes do not count
        answers = [login(client, "capi_console_not-this-one").status_code for _ in range(4)]
        assert answers == [401] * 4
        assert client.get("/", headers=wrong).status_code == 401  # a Bearer failure: the 5th
        limited = login(client, "capi_console_not-this-one")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "capi_console=" not in str(limited.headers.get_list("set-cookie"))
        assert client.get("/", headers=wrong).status_code == 429
        assert login(client, tokens.operator).status_code == 303  # a valid token gets through
        right = {"Authorization": f"Bearer {tokens.viewer}"}
        assert client.get("/", headers=right).status_code == 200


@pytest.mark.parametrize(
    "theirs",
    [
        "Basic dXNlcjpwYXNzd29yZA==",  # a Basic-auth proxy in front: the browser sends it
        "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJqYW5lIn0.c2ln",  # an SSO proxy's id token
    ],
)
def test_a_proxys_own_authorization_header_leaves_the_session_alone(
    console: str, tokens: Tokens, theirs: str
) -> None:
    """An Authorization header that is no console token belongs to whatever stands in
    front (nginx auth_basic, oauth2-proxy --pass-authorization-header): the session
    cookie decides. Every page was 401, then 429 for everyone behind that proxy."""
    header = {"Authorization": theirs}
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=console, headers=header) as client:
        assert client.get("/").status_code == 303  # no session yet: to the login form
        assert login(client, tokens.operator).status_code == 303
        for _ in range(7):  # more than the failed-login limit of 5 a minute
            assert client.get("/").status_code == 200
        assert client.get("/overview.json").status_code == 200
        csrf = csrf_of(client.get("/d/default").text)
        checked = client.post("/d/default/check-key", data={"csrf": csrf})
        assert checked.status_code == 200, checked.text[-500:]
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/").status_code == 303  # logged out
    wrong = {"Authorization": "Bearer capi_console_wrong"}  # a console token: still refused
    assert httpx_get(console + "/", headers=wrong).status_code == 401


def test_login_without_the_forms_csrf_token_is_refused(console: str, tokens: Tokens) -> None:
    answer = httpx_post(console + "/login", data={"token": tokens.operator})
    assert answer.status_code == 403
    assert "capi_console=" not in str(answer.headers.get_list("set-cookie"))


def test_a_post_needs_the_csrf_token_and_the_operator_role(
    console: str, tokens: Tokens, redis_url: str, held: Settings
) -> None:
    form = {"key": "order_created:p-0", "confirm": "yes"}
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=console) as viewer:
        login(viewer, tokens.viewer)
        csrf = csrf_of(viewer.get("/").text)
        assert viewer.post("/d/default/purge", data={**form, "csrf": csrf}).status_code == 403
        assert viewer.get("/d/default/purge?key=order_created:p-0").status_code == 403
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=console) as operator:
        login(operator, tokens.operator)
        assert operator.post("/d/default/purge", data=form).status_code == 403  # no CSRF
        assert operator.post("/d/default/purge", data={**form, "csrf": "x"}).status_code == 403
        stored = redis.Redis.from_url(redis_url)
        assert stored.hlen(held.keys.deadletters) == 2  # nothing purged so far
        shown = confirmation(operator.get("/d/default/purge?key=order_created:p-0").text)
        done = operator.post("/d/default/purge", data=shown)
        assert done.status_code == 200 and "purged 1" in done.text
        assert stored.hlen(held.keys.deadletters) == 1
        stored.close()
        audit = operator.get("/d/default/audit").text
        assert auth.fingerprint(auth.digest(tokens.operator)) in audit and "purged 1" in audit


def test_bearer_tokens_read_every_page_and_post_with_the_csrf_token(
    console: str, tokens: Tokens, redis_url: str, held: Settings
) -> None:
    viewer = {"Authorization": f"Bearer {tokens.viewer}"}
    operator = {"Authorization": f"Bearer {tokens.operator}"}
    for path in ("/", "/d/default", "/d/default/dead-letters", "/d/default/audit"):
        assert httpx_get(console + path, headers=viewer).status_code == 200, path
    form = {"reason": "missing_scope", "confirm": "yes"}
    page = httpx_get(console + "/", headers=viewer).text
    refused = httpx_post(
        console + "/d/default/purge", headers=viewer, data={**form, "csrf": csrf_of(page)}
    )
    assert refused.status_code == 403
    assert httpx_post(console + "/d/default/purge", headers=operator, data=form).status_code == 403
    page = httpx_get(console + "/d/default/purge?reason=missing_scope", headers=operator).text
    done = httpx_post(console + "/d/default/purge", headers=operator, data=confirmation(page))
    assert done.status_code == 200 and "purged 2" in done.text
    assert redis.Redis.from_url(redis_url).hlen(held.keys.deadletters) == 0


def test_a_removed_token_ends_its_sessions(held: Settings, tokens: Tokens, tmp_path: Path) -> None:
    first = start_console(held, tokens, tmp_path / "a.log")
    with httpx.Client(timeout=HTTP_TIMEOUT_S, base_url=first) as client:
        login(client, tokens.viewer)
        cookie = client.cookies["capi_console"]
    others = Tokens(tokens.operator, auth.new_token())  # the viewer's token replaced
    second = start_console(held, others, tmp_path / "b.log")
    answer = httpx_get(second + "/", cookies={"capi_console": cookie})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"


def test_console_token_prints_a_token_whose_line_logs_in(
    sandbox: SandboxThread, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url)
    done = capi(settings, "console-token", "--role", "operator")
    assert done.returncode == 0, done.stderr
    token = re.search(r"token \(shown once\): (\S+)", done.stdout)
    line = re.search(r"^CAPI_CONSOLE_TOKENS_SHA256=(operator:[0-9a-f]{64})$", done.stdout, re.M)
    assert token and line and line.group(1) == f"operator:{auth.digest(token.group(1))}"
    unconfigured = capi(settings, "console", "--port", "0", timeout=60)
    assert unconfigured.returncode != 0 and "CAPI_CONSOLE_TOKENS_SHA256" in unconfigured.stderr
    with pytest.raises(ValueError, match="role:sha256hex"):
        Settings(_env_file=None, console_tokens_sha256="admin:" + "0" * 64)


def test_a_second_console_token_line_keeps_the_first(
    sandbox: SandboxThread, redis_url: str
) -> None:
    """Pasting each printed line into config/capi.env as told must not drop the tokens
    configured before: of two CAPI_CONSOLE_TOKENS_SHA256 lines only the last counts."""
    first = "operator:" + "a" * 64
    settings = make_settings(sandbox, redis_url, console_tokens_sha256=first)
    done = capi(settings, "console-token", "--role", "viewer")
    assert done.returncode == 0, done.stderr
    token = re.search(r"token \(shown once\): (\S+)", done.stdout)
    line = re.search(r"^CAPI_CONSOLE_TOKENS_SHA256=(\S+)$", done.stdout, re.M)
    assert token and line
    assert line.group(1) == f"{first},viewer:{auth.digest(token.group(1))}"
    assert "keeps the 1 entry configured now" in done.stderr
    assert token.group(1) not in done.stderr


def test_the_dead_letter_list_pages_filters_and_searches(
    sandbox: SandboxThread, redis_url: str, tokens: Tokens, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, redis_url)
    base = 1_800_000_000_000  # 2027-01-15T08:00:00Z
    n = 120
    reasons = [Reason.MISSING_SCOPE if i % 4 == 0 else Reason.INVALID_EVENT for i in range(n)]
    ids = [f"o-{i}" for i in range(n)]
    seed_dead_letters(settings, ids, reasons, [base + i * 60_000 for i in range(n)])
    url = start_console(settings, tokens, tmp_path / "console.log")
    get = httpx.Client(
        timeout=HTTP_TIMEOUT_S, base_url=url, headers={"Authorization": f"Bearer {tokens.viewer}"}
    )

    def shown(path: str) -> list[str]:
        return re.findall(r"key=order_created%3A([\w-]+)\">", get.get(path).text)

    first = get.get("/d/default/dead-letters").text
    assert shown("/d/default/dead-letters") == [f"o-{i}" for i in range(119, 69, -1)]
    assert 'href="/d/default/dead-letters?at=50" id="next-page"' in first
    assert len(shown("/d/default/dead-letters?at=100")) == 20
    assert 'id="next-page"' not in get.get("/d/default/dead-letters?at=100").text
    scoped = shown("/d/default/dead-letters?reason=missing_scope")
    assert scoped == [f"o-{i}" for i in range(116, -1, -4)]
    window = shown("/d/default/dead-letters?since=2027-01-15T08:10&until=2027-01-15T08:14")
    assert window == ["o-14", "o-13", "o-12", "o-11", "o-10"]
    assert shown("/d/default/dead-letters?id=o-7") == ["o-7"]
    moved = get.get("/dead-letters?destination=default&reason=missing_scope")
    assert moved.status_code == 303
    assert moved.headers["location"] == "/d/default/dead-letters?reason=missing_scope"
    assert get.get("/dead-letters?destination=nowhere").status_code == 404
    get.close()


def test_a_purge_needs_its_confirmation(console: str, tokens: Tokens, redis_url: str) -> None:
    operator = {"Authorization": f"Bearer {tokens.operator}"}
    csrf = csrf_of(httpx_get(console + "/", headers=operator).text)
    form = {"key": "order_created:p-0", "csrf": csrf}
    confirm = httpx_get(console + "/d/default/purge?key=order_created:p-0", headers=operator)
    assert 'id="purge-count">1<' in confirm.text and 'name="confirm"' in confirm.text
    refused = httpx_post(console + "/d/default/purge", headers=operator, data=form)
    assert refused.status_code == 400
    assert redis.Redis.from_url(redis_url).hlen("capi:dl") == 2
