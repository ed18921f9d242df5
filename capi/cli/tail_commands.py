"""``capi tail``: the most recent outcomes from the live-outcomes ring (:mod:`capi.tail`)."""

from __future__ import annotations

import asyncio
import signal
import sys
import unicodedata

import click

from capi import tail
from capi.cli.common import handle_errors, out, print_json, redis_client, run, settings_from
from capi.cli.selection import destination_names, destination_option
from capi.redisconn import brief
from capi.settings import Settings
from capi.trouble import classify


@click.command("tail")
@click.option("-f", "--follow", is_flag=True, help="Keep printing outcomes as they happen.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@destination_option()
@click.option(
    "--status",
    "statuses",
    type=click.Choice(tail.STATUSES),
    multiple=True,
    help="Only this outcome (repeatable).",
)
@click.option("--id", "ids", metavar="ID", multiple=True, help="Only this event id (repeatable).")
@click.option(
    "-n",
    "--lines",
    "count",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="How many recent outcomes to print first.",
)
@click.pass_context
@handle_errors
def tail_command(
    ctx: click.Context,
    follow: bool,
    as_json: bool,
    destination: str | None,
    statuses: tuple[str, ...],
    ids: tuple[str, ...],
    count: int,
) -> None:
    """Show the most recent outcomes: delivered (request id, latency), validated (test
    mode), retrying (reason, next try), dead-lettered (reason), held, and refused or skipped
    at enqueue or the intake (rule). Newest last; each line names the event id, type,
    destination and the kinds of identifier it carried (never a value or a hash).

    Outcomes come from a ring each destination keeps in Redis (CAPI_TAIL_ENTRIES; the last
    few thousand outcomes of a busy destination). --follow prints new ones as they happen
    until Ctrl-C.

    \b
    Examples:
      capi tail
      capi tail --follow
      capi tail --status dead_lettered --status retrying
      capi tail --id order-1 --json
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)
    rings = {name: settings.keys.for_destination(name).tail for name in names}
    run(_tail(settings, rings, follow, as_json, statuses, ids, count))


async def _tail(
    settings: Settings,
    rings: dict[str, str],
    follow: bool,
    as_json: bool,
    statuses: tuple[str, ...],
    ids: tuple[str, ...],
    count: int,
) -> None:
    # Its calls may block for a whole follow read, on top of the timeout.
    redis = redis_client(settings, socket_timeout=tail.follow_timeout_s(settings.redis_timeout_s))
    try:
        found, newest = await tail.recent(
            redis, rings, count, whole=bool(statuses or ids), statuses=statuses, ids=ids
        )
        for line in found[-count:]:
            _print(line, as_json)
        if not follow:
            if all(last == "0-0" for last in newest.values()):  # no ring has an entry
                out.print("No outcomes recorded yet (send some events).", markup=False)
            elif not found:
                wanted = []
                if ids:
                    wanted.append("--id " + ", ".join(ids))
                if statuses:
                    wanted.append("--status " + ", ".join(statuses))
                sys.stderr.write(
                    f"no outcome kept matches {' and '.join(wanted)}: the live view keeps the "
                    "latest outcomes only (capi dead-letters show ID finds a dead letter)\n"
                )
            return
        names = ", ".join(rings)
        sys.stderr.write(f"following {names} (Ctrl-C to stop)\n")
        sys.stderr.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stream = tail.follow(redis, rings, newest, away=_away).__aiter__()
        while not stop.is_set():
            read = asyncio.ensure_future(stream.__anext__())
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                break
            stopped.cancel()
            for line in tail.matching(read.result(), statuses, ids):
                _print(line, as_json)
    finally:
        await redis.aclose()


def _away(exc: BaseException | None) -> None:
    """Say on stderr that Redis is away (``exc``) or back (None); the follow goes on."""
    if exc is None:
        sys.stderr.write("Redis answers again: following again\n")
    else:
        sys.stderr.write(
            f"{classify(exc)[1]} ({brief(exc)}): still following, trying again every "
            f"{tail.AWAY_RETRY_S:g} s (Ctrl-C to stop)\n"
        )
    sys.stderr.flush()


def _print(line: tail.Line, as_json: bool) -> None:
    if as_json:
        print_json(line.json())
    else:
        sys.stdout.write(_text(line) + "\n")
    sys.stdout.flush()


def _text(line: tail.Line) -> str:
    parts = [
        tail.iso(line.time_ms),
        _plain(line.destination),
        f"{line.status:<13}",
        _plain(line.type),
        _plain(line.id),
        "[" + ",".join(line.identifiers) + "]",
    ]
    if line.request_id:
        parts.append(_plain(line.request_id))
    if line.latency_ms is not None:
        parts.append(f"{line.latency_ms:g} ms")
    if line.reason:
        parts.append(_plain(line.reason))
    if line.next_attempt_ms is not None:
        parts.append("next try " + tail.iso(line.next_attempt_ms))
    return "  ".join(parts)


def _plain(text: str) -> str:
    """Text from outside (ids, reasons) with control and bidi characters made visible."""
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text
    )
