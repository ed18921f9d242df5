"""Property: whatever the producer or ``capi enqueue`` is handed, each event ends queued or
in an EventRejected naming a field and a rule, within bounded time and memory.

Time is bounded by the test's timeout (no timed assertion); memory by tracemalloc's peak,
which must stay far below what the largest hostile inputs would cost if expanded.
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capi.cli import cli
from capi.errors import EventRejected
from capi.events import now_ms
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from tests.helpers import make_settings

PEAK_BYTES = 32 * 1024 * 1024


def valid() -> dict[str, Any]:
    return {
        "id": "evt",
        "type": "custom",
        "custom_event_name": "fuzz",
        "timestamp_ms": now_ms(),
        "action_source": "offline",
        "user": {"email": "a@example.com"},
        "data": {"type": "custom", "amount": 1, "currency": "USD"},
    }


class Opaque:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def cyclic(_: int) -> Any:
    value: dict[str, Any] = {"x": []}
    value["x"].append(value)
    return value


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**80)
    | st.floats()
    | st.text(st.characters(codec=None, categories=None), max_size=30)
    | st.binary(max_size=20)
    | st.builds(Opaque)
)
hostile = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=10,
)
big = (
    st.integers(0, 3000).map(nested)
    | st.integers(0, 1).map(cyclic)
    | st.integers(0, 120_000).map(lambda n: ["a@example.com"] * n)
    | st.integers(0, 120_000).map(lambda n: [f"u{i}@example.com" for i in range(n)])
    | st.integers(0, 2_000_000).map(lambda n: "x" * n)
    | st.integers(1, 200).map(lambda n: [["y" * 1000] * 1000] * n)  # shared, huge if expanded
)
PLACES: list[Callable[[dict[str, Any], Any], None]] = [
    lambda e, v: e.__setitem__("id", v),
    lambda e, v: e.__setitem__("timestamp_ms", v),
    lambda e, v: e.__setitem__("custom_event_name", v),
    lambda e, v: e["user"].__setitem__("email", v),
    lambda e, v: e["user"].__setitem__("first_name", v),
    lambda e, v: e["user"].__setitem__("postal_codes", v),
    lambda e, v: e["data"].__setitem__("extra", v),
    lambda e, v: e["data"].__setitem__("amount", v),
    lambda e, v: e["data"].__setitem__("contents", v),
]


@st.composite
def hostile_events(draw: Any) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(hostile | big)
    event = valid()
    event["id"] = f"evt-{draw(st.integers(0, 10**6))}"
    for _ in range(draw(st.integers(0, 2))):
        draw(st.sampled_from(PLACES))(event, draw(hostile | big))
    return event


def bounded(call: Callable[[], Any]) -> Any:
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES
    return result


fuzz = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.timeout(600)
@fuzz
@given(st.lists(hostile_events(), min_size=1, max_size=4))
def test_producer_queues_or_refuses_every_hostile_value(
    redis_url: str, sandbox: SandboxThread, batch: list[Any]
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with SyncProducer.from_settings(make_settings(sandbox, redis_url)) as producer:
        report = bounded(lambda: producer.enqueue_many(batch))
        for item in batch:
            try:
                bounded(lambda item=item: producer.enqueue(item))
            except EventRejected as exc:
                assert exc.problems and all(p.path and p.rule for p in exc.problems)
    assert len(report.refused) + report.queued + report.duplicates == len(batch)
    for _, exc in report.refused:
        assert isinstance(exc, EventRejected) and exc.problems
    assert client.xlen("capi:events") == report.queued


def to_line(value: Any) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, RecursionError):
        return repr(type(value)).encode()


hostile_lines = (
    hostile_events().map(to_line)
    | st.binary(max_size=300)
    | st.integers(0, 600_000).map(lambda n: b'{"id": "' + b"x" * n + b'"}')
    | st.integers(0, 60_000).map(lambda n: b"[" * n + b"]" * n)
    | st.sampled_from(
        [
            b'{"id": "d", "user": {"email": "a@example.com"}, "user": {}}',
            b'{"id": 1' + b"0" * 5000 + b"}",
            b'{"amount": NaN, "x": Infinity}',
            b'{"id": "\\ud800"}',
        ]
    )
).map(lambda line: line.replace(b"\n", b" "))


@pytest.mark.timeout(600)
@fuzz
@given(st.lists(hostile_lines, min_size=1, max_size=5))
def test_enqueue_cli_queues_or_refuses_every_hostile_line(
    redis_url: str, lines: list[bytes]
) -> None:
    redis.Redis.from_url(redis_url).flushall()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        env = {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
        result = bounded(lambda: CliRunner().invoke(cli, ["enqueue", "--json", str(path)], env=env))
    assert result.exit_code in (0, 4), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    summary = orjson.loads(result.stdout.splitlines()[-1])
    refusals = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("line ") and " refused: " in line  # not "line N: warning: ..."
    ]
    assert summary["refused"] == len(refusals)
    assert all(": " in line.partition(" refused: ")[2] for line in refusals)  # path: rule
    non_blank = sum(1 for line in lines if line.strip())
    assert summary["queued"] + summary["duplicates"] + summary["refused"] == non_blank
