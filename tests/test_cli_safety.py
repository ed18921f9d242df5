"""Text from outside never drives the terminal: an endpoint's error text with escapes,
line breaks and bidi overrides, shown by every command that prints it (a real worker, a
real Redis, an endpoint imitation on loopback, the real ``capi`` commands)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from capi.settings import Settings
from tests.endpoint_helpers import (
    OK,
    Answer,
    Endpoint,
    Request,
    endpoint,
    json_error,
    settings_for,
    worker,
)
from tests.helpers import capi, dead_letters, enqueue, events
from tests.helpers import wait_for as wait

__all__ = ["endpoint", "worker"]  # fixtures

# Retitles the window, clears the screen, reverses what follows, forges a line.
EVIL = "\x1b]0;pwned\x07\x1b[2J\u202edetaler\nFORGED: all events delivered"


def assert_inert(output: str) -> None:
    for char in ("\x1b", "\x07", "\u202e"):
        assert char not in output, repr(output[:400])
    assert not any(line.startswith("FORGED") for line in output.splitlines()), output


def test_an_endpoints_text_is_shown_inert_by_every_command(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    def answer(r: Request) -> Answer:
        if r.validate_only:
            return OK
        if any(i.startswith("first") for i in r.ids):
            return 400, {}, json_error(EVIL, param="events[0]", code=EVIL)
        return 503, {}, EVIL.encode()

    endpoint.answer = answer
    settings = settings_for(endpoint, redis_url, batch_size=1, retry_cap_s=30.0)
    enqueue(settings, events(1, prefix="first-"))
    worker(settings)
    wait(lambda: dead_letters(settings), what="the dead letter")
    enqueue(settings, events(1, prefix="then-"))
    wait(lambda: "failing since" in capi(settings, "status").stdout, what="the endpoint failing")
    (dl_id,) = dead_letters(settings)
    for args in (
        ["status"],
        ["dead-letters", "list"],
        ["dead-letters", "show", dl_id],
        ["support-bundle"],
    ):
        result = capi(settings, *args)
        assert result.returncode == 0, result.stderr
        assert "detaler" in result.stdout + result.stderr or args == ["dead-letters", "list"]
        assert_inert(result.stdout + result.stderr)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('pixel_id = "pix\\u001b[31m"', "pixel_id"),
        ('pixel_id = "pix\\u202egnp"', "pixel_id"),
        ('pixel_id = "pix a"', "pixel_id"),
    ],
)
def test_pixel_ids_with_controls_are_refused_when_the_file_is_read(
    tmp_path: Path, redis_url: str, line: str, field: str
) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(f'[destinations.a]\n{line}\napi_key_env = "K"\n')
    settings = Settings(_env_file=None, redis_url=redis_url, destinations_file=path)
    result = capi(settings, "destinations")
    assert result.returncode == 3, result.stdout + result.stderr
    assert field in result.stderr
    assert_inert(result.stdout + result.stderr)
