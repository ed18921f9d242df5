"""The console's pure parts, with time injected: the login limit's sliding window, the
delivered-per-minute rate, token configuration and fingerprints, the replays kept."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from capi import safetext, tail
from capi.console import actions, auth, views
from capi.console.views import Rates
from capi.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(limiter: auth.LoginLimiter, client: str) -> float:
    """A failed attempt as the console counts one: the wait, else the failure counted."""
    wait = limiter.wait(client)
    if not wait:
        limiter.failed(client)
    return wait


def test_the_login_limit_is_a_sliding_window_of_failures_per_address() -> None:
    clock = Clock()
    limiter = auth.LoginLimiter(attempts=5, window_s=60, monotonic=clock)
    assert [fail(limiter, "a") for _ in range(5)] == [0.0] * 5
    assert fail(limiter, "a") == 60  # the sixth waits for the first to leave the window
    assert fail(limiter, "b") == 0.0  # another address is not held up
    clock.now += 59
    assert fail(limiter, "a") == 1.0
    clock.now += 1.5
    assert fail(limiter, "a") == 0.0  # the first failure left the window


def test_the_login_limit_caps_everyone_and_forgets_the_least_recent_address() -> None:
    clock = Clock()
    limiter = auth.LoginLimiter(attempts=5, window_s=60, total=10, clients=3, monotonic=clock)
    assert [fail(limiter, f"10.0.0.{i}") for i in range(10)] == [0.0] * 10
    assert fail(limiter, "10.0.0.99") == 60  # a new address: everyone's failures are at the cap
    assert list(limiter._seen) == ["10.0.0.7", "10.0.0.8", "10.0.0.9"]  # three kept, newest
    clock.now += 61
    assert fail(limiter, "10.0.0.99") == 0.0
    assert list(limiter._seen) == ["10.0.0.8", "10.0.0.9", "10.0.0.99"]


def test_delivered_per_minute_comes_from_samples_over_the_last_two_minutes() -> None:
    clock = Clock()
    rates = Rates(monotonic=clock)
    assert rates.per_minute("d", 100) is None  # one sample says nothing
    clock.now += 2
    assert rates.per_minute("d", 110) is None  # too short a span
    clock.now += 28
    assert rates.per_minute("d", 400) == 600.0  # 300 in 30 s
    clock.now += 200
    assert rates.per_minute("d", 400) is None  # the old samples are forgotten
    clock.now += 10
    assert rates.per_minute("d", 400) == 0.0


def test_configured_tokens_and_fingerprints() -> None:
    token = auth.new_token()
    digest = auth.digest(token)
    tokens = auth.configured(f" operator:{digest} ,viewer:{'a' * 64}")
    assert tokens == {digest: "operator", "a" * 64: "viewer"}
    found = auth.bearer(token, tokens)
    assert found is not None and found.operator and found.via == "bearer"
    assert found.fingerprint == f"console-token sha256:{digest[:8]}"
    assert token not in found.fingerprint and digest not in found.fingerprint
    assert auth.bearer(token + "x", tokens) is None
    assert not auth.same("", "") and auth.same(found.csrf, found.csrf)


def test_every_template_and_static_file_ships_in_the_package() -> None:
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["capi.console"]
    package = root / "capi" / "console"
    for path in [*package.glob("templates/*"), *package.glob("static/*")]:
        name = str(path.relative_to(package))
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} would not be installed"


def test_finished_replays_are_forgotten_beyond_the_newest_kept() -> None:
    kept = actions.Actions(Settings(_env_file=None), None)  # type: ignore[arg-type]
    for i in range(actions.KEPT_JOBS + 50):
        state = "running" if i == 0 else "completed"
        kept.jobs[f"j{i}"] = actions.Job(f"j{i}", "default", 1, "someone", state=state)
    kept._forget_old()
    assert "j0" in kept.jobs  # still running: kept
    finished = [k for k, v in kept.jobs.items() if v.state != "running"]
    assert len(finished) == actions.KEPT_JOBS and finished[-1] == f"j{actions.KEPT_JOBS + 49}"


def test_the_live_page_escapes_the_characters_the_pages_escape() -> None:
    script = (Path(views.__file__).parent / "static" / "console.js").read_text()
    found = re.search(r"const UNSAFE = /\[(.*)\]/g;", script)
    assert found
    in_js = re.sub(r"\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1), 16)), found.group(1))
    assert re.compile(f"[{in_js}]").pattern == safetext._UNSAFE.pattern


def test_a_recent_outcomes_request_id_is_redacted() -> None:
    line = tail.Line(
        0, "default", "o-1", "order_created", "rejected", [], request_id="req 1 a@b.co"
    )
    assert views.shown_line(line)["request_id"] == "req 1 (email hidden)"
    assert "request_id" not in views.shown_line(replace(line, request_id=None))
