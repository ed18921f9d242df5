"""Hostile input from Python callers: queued or a clear EventRejected, never anything else."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import pytest
import redis

from capi.deadletters import DeadLetter, build
from capi.errors import EventRejected
from capi.events import prepare
from capi.failures import Reason
from capi.jsondata import MAX_DEPTH
from capi.producer import Producer, SyncProducer
from capi.queue import Entry
from capi.sandbox import SandboxThread
from tests.helpers import make_settings
from tests.test_events import NOW_MS, base, clock


def custom(data: dict[str, Any], **top: Any) -> dict[str, Any]:
    return base(type="custom", custom_event_name="hostile", data={"type": "custom", **data}, **top)


def nested(depth: int) -> Any:
    """A value that is ``depth`` levels of lists deep (1 = a flat list)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


class Exploding(Mapping[str, Any]):
    """A Mapping whose items cannot be read."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1


def cyclic() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["me"] = data
    return custom(data)


def shared_fan_out() -> dict[str, Any]:
    row = ["x" * 100] * 1000
    return custom({"rows": [row] * 1000})  # 100 MB if expanded, a few KB in memory


def emails(n: int) -> dict[str, Any]:
    return base(user={"email": [f"user{i}@example.com" for i in range(n)]})


# (case, event, the path and rule the refusal must name)
HOSTILE: list[tuple[str, Any, str]] = [
    ("bytes id", base(id=b"evt-1"), "id: must be JSON data"),
    ("bytes email", base(user={"email": b"a@example.com"}), "user.email: must be JSON data"),
    ("object in data", custom({"x": object()}), "data.x: must be JSON data"),
    ("set in data", custom({"x": {1, 2}}), "data.x: must be JSON data"),
    ("exploding mapping", Exploding(), "(event): could not be read as an event"),
    ("cycle", cyclic(), f"nests deeper than {MAX_DEPTH} levels"),
    ("too deep", custom({"x": nested(MAX_DEPTH)}), f"nests deeper than {MAX_DEPTH} levels"),
    ("shared fan-out", shared_fan_out(), "(event): is more than 256 KiB as JSON"),
    ("80,000 emails", emails(80_000), "(event): is more than 256 KiB as JSON"),
    ("NaN", custom({"score": float("nan")}), "data.score: must be a finite number"),
    ("infinity", custom({"score": float("inf")}), "data.score: must be a finite number"),
    ("int beyond 64 bits", custom({"n": 10**30}), "data.n: is beyond the 64-bit integer range"),
    ("non-string key", custom({"x": {1: "a"}}), "data.x: has a key that is not a string (int)"),
    ("lone surrogate", base(oppref="ab\ud800"), "oppref: must be valid Unicode text"),
    ("timestamp beyond 64 bits", base(timestamp_ms=2**64), "timestamp_ms: is beyond the 64-bit"),
    ("not an object", b"{}", "(event): must be a JSON object, got bytes"),
]


@pytest.mark.timeout(30)  # the 80,000 emails took 60 s when de-duplication was quadratic
@pytest.mark.parametrize(("case", "event", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_refused_naming_field_and_rule(
    redis_url: str, sandbox: SandboxThread, case: str, event: Any, message: str
) -> None:
    settings = make_settings(sandbox, redis_url)
    with SyncProducer.from_settings(settings, clock=clock) as producer:
        with pytest.raises(EventRejected) as info:
            producer.enqueue(event)
        assert message in str(info.value)
        assert "example.com" not in str(info.value)  # never quotes an identifier
        report = producer.enqueue_many([base(id="ok-a"), event, base(id="ok-b")])
    assert report.queued == 2
    assert [i for i, _ in report.refused] == [1]
    assert redis.Redis.from_url(redis_url).xlen(settings.keys.stream) == 2


def test_async_producer_refuses_hostile_values_too(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)

    async def go() -> None:
        async with Producer.from_settings(settings, clock=clock) as producer:
            with pytest.raises(EventRejected, match="nests deeper"):
                await producer.enqueue(cyclic())
            report = await producer.enqueue_many([cyclic(), Exploding(), base(id="ok-1")])
            assert (report.queued, [i for i, _ in report.refused]) == (1, [0, 1])

    asyncio.run(go())


def test_the_deepest_accepted_event_round_trips_through_a_dead_letter() -> None:
    event = custom({"x": nested(MAX_DEPTH - 2)})  # event 1, data 2, x and its lists 3..32
    prepared = prepare(event, clock=clock)
    entry = Entry(b"1-0", prepared.json, prepared.id, prepared.timestamp_ms)
    record = build(
        entry,
        reason=Reason.INVALID_EVENT,
        guidance="g",
        error=None,
        key_fingerprint="fp",
        pixel_id="px",
        now_ms=NOW_MS,
        attempted=True,
    )
    again = DeadLetter.model_validate_json(record.to_json())
    assert again.event == orjson.loads(prepared.json)


def test_duplicated_emails_are_deduplicated_and_the_input_is_untouched() -> None:
    event = emails(1)
    event["user"]["email"] = ["a@example.com", " A@example.com", "b@example.com"] * 2000
    body = orjson.loads(prepare(event, clock=clock).json)
    assert len(body["user"]["emails_sha256"]) == 2
    assert len(event["user"]["email"]) == 6000


def test_tuples_and_str_subclasses_are_plain_json() -> None:
    class Tag(str):
        def __str__(self) -> str:
            raise RuntimeError("a subclass's own methods are never called")

    event = base(id=Tag("evt-t"), data={"type": "contents", "contents": ({"id": "sku"},)})
    body = orjson.loads(prepare(event, clock=clock).json)
    assert body["id"] == "evt-t"
    assert body["data"]["contents"] == [{"id": "sku"}]


def line(event: Any) -> bytes:
    import json

    return json.dumps(event).encode()  # json, not orjson: it writes integers of any size


def enqueue_cli(redis_url: str, path: Any) -> Any:
    import os

    from click.testing import CliRunner

    from capi.cli import cli

    env = {"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
    return CliRunner().invoke(cli, ["enqueue", "--json", str(path)], env=env)


def fresh(event_id: str) -> dict[str, Any]:
    from capi.events import signup

    return signup(event_id, email="a@example.com", source_url="https://a.example/")


# (case, the line, what the refusal says): each sits between two good lines.
HOSTILE_LINES: list[tuple[str, bytes, str]] = [
    ("16 MB line", b'{"id": "' + b"x" * 16_000_000 + b'"}', "(line): is longer than 256 KiB"),
    (
        "duplicate key",
        b'{"id": "d", "user": {"email": "a@example.com"}, "user": {}}',
        "(line): repeats the key 'user' in one object",
    ),
    ("NaN", b'{"id": "n", "timestamp_ms": NaN}', "NaN is not a JSON number"),
    ("deep brackets", b"[" * 50_000 + b"]" * 50_000, "(line): nests too deeply to parse"),
    ("huge integer", b'{"id": "i", "timestamp_ms": 1' + b"0" * 5000 + b"}", "is not valid JSON"),
    (
        "amount beyond 64 bits",
        line(fresh("a") | {"data": {"type": "customer_action", "amount": 10**30}}),
        "data.amount: is beyond the 64-bit integer range",
    ),
    (
        "deep custom data",
        line(
            fresh("c")
            | {
                "type": "custom",
                "custom_event_name": "c",
                "data": {"type": "custom", "x": nested(40)},
            }
        ),
        f"nests deeper than {MAX_DEPTH} levels",
    ),
    ("blank id", line(fresh(" \t ")), "id: must not be blank"),
    ("NUL in id", line(fresh("a\x00b")), "id: must not contain control characters"),
    (
        "custom name with a newline",
        line(
            fresh("e")
            | {"type": "custom", "custom_event_name": "quiz\n", "data": {"type": "custom"}}
        ),
        "custom_event_name: must be 1-64 letters",
    ),
    ("not UTF-8", b'{"id": "\xff"}', "(line): is not UTF-8"),
    ("JSON null", b"null", "(event): must be a JSON object, got null"),  # found by hypothesis
]


@pytest.mark.parametrize(
    ("case", "bad", "message"), HOSTILE_LINES, ids=[h[0] for h in HOSTILE_LINES]
)
def test_enqueue_cli_refuses_a_hostile_line_and_queues_its_neighbours(
    redis_url: str, tmp_path: Any, case: str, bad: bytes, message: str
) -> None:
    import tracemalloc

    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([line(fresh("before")), bad, line(fresh("after"))]) + b"\n")
    tracemalloc.start()
    try:
        result = enqueue_cli(redis_url, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 4, result.output
    [refusal] = result.stderr.splitlines()
    assert refusal.startswith("line 2: event")
    assert message in refusal
    assert "line 1" not in result.stderr and "line 3" not in result.stderr
    assert orjson.loads(result.stdout.splitlines()[-1])["queued"] == 2
    assert redis.Redis.from_url(redis_url).xlen("capi:events") == 2
    assert peak < 16 * 1024 * 1024  # a line is never held whole past 256 KiB
