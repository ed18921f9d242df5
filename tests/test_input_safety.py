"""Input never leaks or misleads: refusals quote little (and no personal data), URLs lose
their credentials, event ids cannot forge log lines, and markup in data or paths is text."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from click.testing import CliRunner

from capi.errors import EventRejected
from capi.events import prepare, purchase, signup
from capi.logs import TextFormatter
from capi.sandbox import SandboxThread
from tests.helpers import doom, drain, enqueue, make_settings
from workers.cli import cli

NOW = 1_790_000_000.0


def clock() -> float:
    return NOW


def refusal(event: dict[str, Any]) -> str:
    with pytest.raises(EventRejected) as info:
        prepare(event, clock=clock)
    return str(info.value)


def test_a_currency_or_country_refusal_never_quotes_an_email() -> None:
    event = purchase("o-1", amount=100, currency="ada@example.com", clock=clock)
    event["source_url"] = "https://a.example/"
    event["user"] = {"countries": ["bob@example.com"]}
    message = refusal(event)
    assert "data.currency" in message and "user.countries[0]" in message
    assert "@example.com" not in message and "ada" not in message
    typo = purchase("o-2", amount=100, currency="USDD", source_url="https://a/", clock=clock)
    assert "'USDD'" in refusal(typo)  # a short code-like typo is still shown


def test_a_huge_id_is_quoted_as_a_short_prefix() -> None:
    huge = "x" * 5_000_000
    event = signup(huge, source_url="https://a.example/", clock=clock)
    event["data"]["coupon"] = "nope"
    message = refusal(event)
    assert len(message) < 2_000
    assert "'xxxx" in message and "5,000,000 characters" in message
    event = signup("s-1", source_url="https://a.example/", clock=clock)
    event["data"]["k" * 1_000_000] = 1  # an unknown field with a huge name
    assert len(refusal(event)) < 2_000


def test_source_url_loses_user_and_password() -> None:
    event = signup(
        "s-1", source_url="https://ada:hunter2@shop.example:8443/a?email=x#f", clock=clock
    )
    body = prepare(event, clock=clock).json
    assert b'"source_url":"https://shop.example:8443/a"' in body
    assert b"hunter2" not in body and b"ada" not in body


def test_an_id_with_a_newline_cannot_forge_a_text_log_line() -> None:
    forged = "o-1\n2026-11-23 10:00:00,000 ERROR   capi.sender: key leaked"
    record = logging.LogRecord("capi.sender", logging.INFO, __file__, 1, "sent %s", (forged,), None)
    record.event_ids = [forged, "o-2\r\x1b[31m"]
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "o-1\\n2026" in line  # escaped, still readable


def test_markup_in_an_id_or_a_config_path_is_printed_as_text(
    redis_url: str, sandbox: SandboxThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(sandbox, redis_url)
    odd = "o-[/]-[bold]x"
    enqueue(settings, [purchase(odd, amount=1, currency="USD", source_url="https://a/")])
    doom(settings, {odd})
    drain(settings)
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    env = {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
    result = CliRunner().invoke(cli, ["dead-letters", "list"], env=env)
    assert result.exit_code == 0, result.output
    assert odd in result.output
    missing = CliRunner().invoke(cli, ["--config", "[/]nowhere.env", "status"], env=env)
    assert missing.exit_code == 3, missing.output
    assert "[/]nowhere.env" in missing.output and "Traceback" not in missing.output
