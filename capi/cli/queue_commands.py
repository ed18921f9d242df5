"""``capi enqueue`` and ``capi status``."""

from __future__ import annotations

import sys
from typing import IO, Any

import click
import orjson
import redis.asyncio as aioredis

from capi.cli.common import err, handle_errors, out, print_json, run, settings_from
from capi.cli.main import cli
from capi.errors import EventRejected, Problem
from capi.exitcodes import ExitCode
from capi.producer import EnqueueReport, SyncProducer
from capi.status import gather

_CHUNK = 500


@cli.command("enqueue")
@click.argument("file", type=click.File("rb"), default="-")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@handle_errors
def enqueue_command(ctx: click.Context, file: IO[bytes], as_json: bool) -> None:
    """Validate and enqueue events from JSON Lines (FILE, or stdin).

    One event per line in the API's format; raw identifiers may be given under ``user``
    (email, phone, external_id, first_name, last_name) and are hashed before queueing.
    Each refused line is reported with its reason; the exit code is 4 if any was refused.

    \b
    Example:
      echo '{"id":"o-1","type":"order_created","timestamp_ms":1795000000000,
             "action_source":"web","source_url":"https://shop.example/thanks",
             "user":{"email":"ada@example.com"},
             "data":{"type":"contents","amount":12999,"currency":"USD"}}' | capi enqueue
    """
    settings = settings_from(ctx)
    total = EnqueueReport()
    lines_read = 0
    with SyncProducer.from_settings(settings) as producer:
        batch: list[tuple[int, Any]] = []
        for lineno, line in enumerate(file, 1):
            lines_read = lineno
            parsed = _parse_line(lineno, line, total)
            if parsed is not None:
                batch.append((lineno, parsed))
            if len(batch) >= _CHUNK:
                _flush(producer, batch, total)
        _flush(producer, batch, total)
    for lineno, exc in sorted(total.refused, key=lambda r: r[0]):
        err.print(f"line {lineno}: {exc}", markup=False)
    summary = {
        "lines": lines_read,
        "queued": total.queued,
        "duplicates": total.duplicates,
        "refused": len(total.refused),
    }
    if as_json:
        print_json(summary)
    else:
        out.print(
            f"queued {total.queued}, duplicates {total.duplicates} (already queued), "
            f"refused {len(total.refused)}"
        )
    if total.refused:
        sys.exit(ExitCode.REFUSED)


def _parse_line(lineno: int, line: bytes, report: EnqueueReport) -> Any:
    if not line.strip():
        return None
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        why = "is not UTF-8" if _not_utf8(line) else f"is not valid JSON ({exc.msg})"
        report.refused.append((lineno, EventRejected([Problem("(line)", why)])))
        return None


def _not_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _flush(producer: SyncProducer, batch: list[tuple[int, Any]], total: EnqueueReport) -> None:
    if not batch:
        return
    report = producer.enqueue_many(event for _, event in batch)
    total.queued += report.queued
    total.duplicates += report.duplicates
    total.refused += [(batch[i][0], exc) for i, exc in report.refused]
    batch.clear()


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@handle_errors
def status_command(ctx: click.Context, as_json: bool) -> None:
    """Queue depth, in flight, retries, counters, dead letters by reason, key state.

    \b
    Example:
      capi status --json | jq .key
    """
    settings = settings_from(ctx)

    async def go() -> dict[str, Any]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await gather(client, settings.keys)
        finally:
            await client.aclose()

    status = run(go())
    if as_json:
        print_json(status)
        return
    key = status["key"]
    counters = status["counters"]
    out.print(f"queued:        {status['queued']} (oldest {status['oldest_queued_age_s']} s)")
    out.print(f"in flight:     {status['in_flight']}")
    out.print(f"retries:       {status['retry_batches_scheduled']} batches scheduled")
    for name in ("enqueued", "delivered", "retried", "dead_lettered", "transient_key_failures"):
        out.print(f"{name + ':':<15}{counters.get(name, 0)}")
    reasons = ", ".join(f"{k} {v}" for k, v in status["dead_letters_by_reason"].items())
    out.print(f"dead letters:  {status['dead_letters']}" + (f" ({reasons})" if reasons else ""))
    line = f"key:           {key.get('state')}"
    if key.get("state") == "held":
        line += f" since {key.get('since')} ({key.get('reason')})"
    out.print(line)
    out.print(f"workers alive: {len(status['workers_alive'])}")
    if key.get("state") == "held":
        out.print(key.get("guidance", ""), markup=False)
