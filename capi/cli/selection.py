"""What ``capi dead-letters`` commands share: the filter options, turning them into a
:class:`~capi.replay.Selection`, and selecting the dead letters they name."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from capi import clock, deadletters, destinations, replay, schema
from capi.cli.common import err, redis_client
from capi.deadletters import DeadLetter, Outline, Unreadable
from capi.failures import Reason
from capi.replay import Selection
from capi.reproduce import cli_target
from capi.safetext import shown
from capi.settings import Settings

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(value: str | None, now_ms: int, option: str | None = None) -> int | None:
    """``2h``/``30m``/``7d`` ago, or an ISO 8601 time, as Unix milliseconds; a value that
    is neither is refused naming ``option`` (``--since``, ``--until``)."""
    if not value:
        return None
    if m := _RELATIVE.match(value.strip()):
        return now_ms - int(m.group(1)) * _UNITS[m.group(2)] * 1000
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use e.g. 30m, 2h, 7d or 2026-11-23T10:00", param_hint=option
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return clock.ms(when.timestamp())


def human_duration(ms: int) -> str:
    """A duration like ``3d4h``, ``2h5m``, ``40s``; negative durations get a minus."""
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    s = ms // 1000
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{sign}{d}d{h}h"
    if h:
        return f"{sign}{h}h{m}m"
    if m:
        return f"{sign}{m}m"
    return f"{sign}{s}s"


def destination_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--destination NAME[,NAME...]``: only these destinations (default: all)."""
    return click.option(
        "--destination",
        "destination",
        metavar="NAME[,NAME...]",
        help="Only these destinations (default: all).",
    )


def destination_names(settings: Settings, value: str | Sequence[str] | None) -> list[str]:
    """The destinations an option names (all configured ones if none); UsageError if one
    is not configured."""
    configured = destinations.names(settings)
    if isinstance(value, str):
        value = [n.strip() for n in value.split(",") if n.strip()]
    if not value:
        return configured
    unknown = [n for n in value if n not in configured]
    if unknown:
        raise click.BadParameter(
            f"{unknown[0]!r} is not configured; the destinations are: {', '.join(configured)}",
            param_hint="--destination",
        )
    return list(dict.fromkeys(value))


def filters(func: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options shared by list, replay, export and purge."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--reason",
            "reasons",
            multiple=True,
            type=click.Choice([r.value for r in Reason]),
            help="Only this reason (repeatable).",
        ),
        click.option(
            "--type",
            "types",
            multiple=True,
            help="Only this event type, or custom event name (repeatable).",
        ),
        click.option("--since", help="Dead-lettered since: 30m, 2h, 7d or an ISO time."),
        click.option("--until", help="Dead-lettered until: 30m, 2h, 7d or an ISO time."),
        destination_option(),
        click.option(
            "--replayable/--expired",
            default=None,
            help="Only those the API can still accept (within 7 days), or only the others.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def selection_from(ids: Sequence[str], kw: dict[str, Any], now_ms: int) -> Selection:
    """Build a Selection from command arguments."""
    return Selection(
        ids=list(ids),
        reasons=list(kw.get("reasons") or []),
        event_types=list(kw.get("types") or []),
        since_ms=parse_when(kw.get("since"), now_ms, "--since"),
        until_ms=parse_when(kw.get("until"), now_ms, "--until"),
        replayable=kw.get("replayable"),
        destinations=[n.strip() for n in (kw.get("destination") or "").split(",") if n.strip()],
    )


def now_ms() -> int:
    """The current Unix time in milliseconds."""
    return clock.now_ms()


async def _check_types(
    client: Any, settings: Settings, names: Sequence[str], selection: Selection
) -> None:
    """Raise click.BadParameter for a ``--type`` that is neither a standard event type nor
    the type of any dead letter (a misspelling would otherwise select nothing, silently);
    the records are read a slice at a time until every such type is seen."""
    unknown = {t for t in selection.event_types if t not in schema.STANDARD_TYPES}
    if not unknown:
        return
    sources = [(n, settings.keys.for_destination(n)) for n in names]
    async for record in deadletters.scan(client, sources):
        unknown.discard(record.event_type)
        if not unknown:
            return
    missing = [t for t in selection.event_types if t in unknown]
    raise click.BadParameter(
        f"{', '.join(map(repr, missing))} is no event type: use one of "
        f"{', '.join(schema.STANDARD_TYPES)}, or a custom event name a dead "
        "letter has",
        param_hint="--type",
    )


async def iter_selected(
    settings: Settings, selection: Selection, unreadable: list[Unreadable]
) -> AsyncIterator[DeadLetter]:
    """The selected dead letters, newest first, read a slice at a time (see
    :func:`capi.deadletters.scan`): a command over 200,000 dead letters holds a slice, not
    all of them. Records that cannot be read are skipped and added to ``unreadable``
    (opens and closes its own connection).

    Raises click.BadParameter for a ``--type`` that is neither a standard event type nor
    the type of any dead letter.
    """
    client = redis_client(settings)
    names = destination_names(settings, selection.destinations)
    now = now_ms()
    try:
        await _check_types(client, settings, names, selection)
        if selection.ids:  # named records: found one by one, never a scan of every record
            found: list[DeadLetter] = []
            for name in names:
                keys = settings.keys.for_destination(name)
                skipped: list[Unreadable] = []
                for record in await replay.select(client, keys, selection, now, skipped):
                    record.destination = name  # where it is stored is where it goes
                    found.append(record)
                unreadable += [dataclasses.replace(u, destination=name) for u in skipped]
            found.sort(key=lambda r: r.dead_lettered_ms, reverse=True)
            for record in found:
                yield record
            return
        sources = [(n, settings.keys.for_destination(n)) for n in names]
        async for record in deadletters.scan(
            client,
            sources,
            since_ms=selection.since_ms,
            until_ms=selection.until_ms,
            unreadable=unreadable,
        ):
            if selection.matches(record, now):
                yield record
    finally:
        await client.aclose()


async def indexed(settings: Settings, selection: Selection) -> int:
    """How many dead letters the selected destinations' time indexes hold in the
    selection's time range (before any other filter), in one round trip."""
    client = redis_client(settings)
    low = "-inf" if selection.since_ms is None else selection.since_ms
    high = "+inf" if selection.until_ms is None else selection.until_ms
    try:
        pipe = client.pipeline(transaction=False)
        for name in destination_names(settings, selection.destinations):
            pipe.zcount(settings.keys.for_destination(name).deadletter_index, low, high)
        return sum(int(n) for n in await pipe.execute())
    finally:
        await client.aclose()


async def select_with_unreadable(
    settings: Settings, selection: Selection
) -> tuple[list[DeadLetter], list[Unreadable]]:
    """The selected dead letters, newest first, and the records that could not be read
    (opens and closes its own connection); see :func:`iter_selected`."""
    unreadable: list[Unreadable] = []
    records = [r async for r in iter_selected(settings, selection, unreadable)]
    return records, unreadable


async def select_outlines(
    settings: Settings, selection: Selection, each: Callable[[DeadLetter], None] | None = None
) -> tuple[list[Outline], list[Unreadable]]:
    """The outlines of the selected dead letters (what a replay or a purge acts on; see
    :class:`~capi.deadletters.Outline`), newest first, each record seen whole by ``each``
    (if given) as it is read; and the records that could not be read."""
    unreadable: list[Unreadable] = []
    outlines = []
    async for record in iter_selected(settings, selection, unreadable):
        if each is not None:
            each(record)
        outlines.append(record.outline())
    return outlines, unreadable


async def select_records(settings: Settings, selection: Selection) -> list[DeadLetter]:
    """The selected dead letters, newest first; says on stderr which records it skipped."""
    records, unreadable = await select_with_unreadable(settings, selection)
    warn_unreadable(unreadable)
    return records


def warn_unreadable(unreadable: Sequence[Unreadable]) -> None:
    """Tell the operator which stored records were skipped, and how to look at them."""
    for u in unreadable:
        target = cli_target(u.key, u.destination)
        err.print(
            f"warning: skipped dead letter {shown(u.key)}: it cannot be read ({u.why}); "
            f"`capi dead-letters show {shown(target)}` prints it as stored, "
            f"`capi dead-letters purge {shown(target)}` removes it",
            markup=False,
        )


def report_not_found(
    ids: Sequence[str], records: Sequence[DeadLetter | Outline | Unreadable]
) -> list[str]:
    """Say which of the ids the operator named match no dead letter; return them."""
    found = {r.id for r in records} | {r.key for r in records}
    missing = [i for i in ids if i not in found]
    if missing:
        err.print(
            f"not found: {', '.join(missing)} (no dead letter with that id or key: already "
            "replayed or purged, or misspelled; see capi dead-letters list)",
            markup=False,
        )
    return missing
