"""Bad input, generated: the producer and ``capi enqueue`` refuse clearly, never crash, and
never leave anything half-written in Redis."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import orjson
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capi.cli import cli
from capi.errors import EventRejected
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from tests.helpers import events, make_settings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "id",
    "type",
    "timestamp_ms",
    "custom_event_name",
    "source_url",
    "action_source",
    "user",
    "opt_out",
    "data",
    "oppref",
]


@st.composite
def mutated_events(draw: Any) -> Any:
    event = json.loads(json.dumps(events(1, start=draw(st.integers(0, 1)))[0]))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "data", "user", "drop"]))
        if where == "drop":
            event.pop(draw(st.sampled_from(FIELDS)), None)
        elif where == "top":
            event[draw(st.sampled_from([*FIELDS, "extra"]))] = draw(json_values)
        else:
            target = event.setdefault(where, {})
            if isinstance(target, dict):
                target[
                    draw(
                        st.sampled_from(
                            [
                                "type",
                                "amount",
                                "currency",
                                "contents",
                                "email",
                                "phone",
                                "emails_sha256",
                                "x",
                            ]
                        )
                    )
                ] = draw(json_values)
    return event


fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(st.lists(mutated_events() | json_values, min_size=1, max_size=8))
def test_producer_refuses_or_queues_and_writes_nothing_else(
    redis_url: str, sandbox: SandboxThread, batch: list[Any]
) -> None:
    settings_ = make_settings(sandbox, redis_url)
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with SyncProducer.from_settings(settings_) as producer:
        report = producer.enqueue_many(batch)  # never raises
        for _, exc in report.refused:
            assert isinstance(exc, EventRejected)
            assert exc.problems and all(p.path and p.rule for p in exc.problems)
        for item in batch:
            with contextlib.suppress(EventRejected):
                producer.enqueue(item)
    queued = client.xlen(settings_.keys.stream)
    assert queued == report.queued
    shards = list(client.scan_iter(match=f"{settings_.keys.dedup_prefix}*"))
    digests = sum(int(client.strlen(k)) for k in shards) // 16
    assert digests == queued  # no dedup record without its event, none for refusals
    for _, fields in client.xrange(settings_.keys.stream):
        orjson.loads(fields[b"e"])  # every queued event is whole JSON


@fuzz
@given(st.lists(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), max_size=6))
def test_enqueue_cli_reports_every_bad_line(redis_url: str, lines: list[bytes]) -> None:
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    env = {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
    result = CliRunner().invoke(cli, ["enqueue", "--json"], input=data, env=env)
    assert result.exit_code in (0, 4), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    summary = json.loads(result.stdout.splitlines()[-1])
    bad_lines = result.stderr.count("line ")
    assert summary["refused"] == bad_lines
    assert (result.exit_code == 4) == (bad_lines > 0)


def test_huge_strings_and_non_utf8_are_refused_clearly(redis_url: str) -> None:
    huge = events(1)[0] | {"oppref": "x" * 600_000}
    lines = [orjson.dumps(huge), b"\xff\xfe not utf-8", b'{"id": "a"', b"[]", b'"just a string"']
    env = {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
    result = CliRunner().invoke(cli, ["enqueue"], input=b"\n".join(lines), env=env)
    assert result.exit_code == 4
    assert "line 1: event refused: (line): is longer than 256 KiB" in result.stderr
    assert "line 2: event refused: (line): is not UTF-8" in result.stderr
    assert "line 3: event refused: (line): is not valid JSON" in result.stderr
    assert "line 4: event refused: (event): must be a JSON object, got a list" in result.stderr
    assert redis.Redis.from_url(redis_url).xlen("capi:events") == 0
