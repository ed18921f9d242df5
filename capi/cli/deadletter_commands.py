"""``capi dead-letters list / show / replays / export / purge`` (replay and support-bundle
have modules of their own; the shared filters are in :mod:`capi.cli.selection`)."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import click
import orjson
from rich.table import Table
from rich.text import Text

from capi import destinations, replay, safetext
from capi._aio import aw
from capi.cli.common import (
    PrivateFile,
    cli_actor,
    err,
    fail,
    handle_errors,
    out,
    plural,
    print_json,
    progress,
    redis_client,
    run,
    settings_from,
)
from capi.cli.main import cli
from capi.cli.selection import (
    destination_names,
    destination_option,
    filters,
    human_duration,
    indexed,
    iter_selected,
    now_ms,
    report_not_found,
    select_outlines,
    select_with_unreadable,
    selection_from,
    warn_unreadable,
)
from capi.deadletters import DeadLetter, Outline, Unreadable, iso
from capi.destinations import Destination
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.replay import Selection, can_replay
from capi.reproduce import curl_for, key_expression
from capi.settings import Settings

_WARN_WITHIN_MS = 24 * 3600 * 1000


@cli.group("dead-letters")
def dead_letters() -> None:
    """Inspect, explain, replay, export and purge events that could not be delivered.

    \b
    Example:
      capi dead-letters list --replayable
    """


@dead_letters.command("list")
@filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
@click.option("--limit", type=int, default=None, help="Show at most this many.")
@click.pass_context
@handle_errors
def list_command(ctx: click.Context, /, as_json: bool, limit: int | None, **kw: Any) -> None:
    """List dead letters, newest first, with a summary by reason.

    \b
    Examples:
      capi dead-letters list --reason missing_scope --since 2h
      capi dead-letters list --replayable --json | jq -r .id
    """
    settings = settings_from(ctx)
    now = now_ms()
    selection = selection_from((), kw, now)
    several = len(destination_names(settings, None)) > 1
    columns = ["destination"] if several else []
    table = Table(*columns, "id", "type", "reason", "age", "attempts", "replay within", box=None)
    summary = _Summary(settings, now)

    async def go() -> list[Unreadable]:
        # Read a slice at a time: only the rows shown are kept (all of them without
        # --limit), the rest are counted for the summary and let go.
        unreadable: list[Unreadable] = []
        async for r in iter_selected(settings, selection, unreadable):
            shown = not limit or summary.total < limit
            summary.add(r)
            if not shown:
                continue
            if as_json:
                sys.stdout.buffer.write(replay.to_json_line(r))
                continue
            left = r.replay_deadline_ms - now
            window = human_duration(left) if can_replay(r, now) else "[red]never[/]"
            table.add_row(
                *([Text(safetext.shown(r.destination))] if several else []),
                Text(safetext.shown(r.id)),  # ids are data, never markup
                Text(safetext.shown(r.event_type)),
                r.reason.value,
                human_duration(now - r.dead_lettered_ms),
                str(r.attempts),
                window,
            )
        return unreadable

    warn_unreadable(run(go()))
    if as_json:
        return
    if not summary.total:
        out.print("No dead letters.")
        return
    out.print(table)
    out.print(
        f"{plural(summary.total, 'dead letter')}: "
        + ", ".join(f"{k} {v}" for k, v in summary.reasons.items())
    )
    summary.warn()


class _Summary:
    """What ``list`` says under its table, counted one record at a time: how many dead
    letters by reason, and how many pass their replay deadline or the retention limit
    within 24 h."""

    def __init__(self, settings: Settings, now: int) -> None:
        self.now = now
        self.retention_days = settings.deadletter_retention_days
        self.retention_ms = int(settings.deadletter_retention_days * 86_400_000)
        self.total = 0
        self.reasons: Counter[str] = Counter()
        self.soon = 0
        self.pruned_soon = 0

    def add(self, r: DeadLetter) -> None:
        self.total += 1
        self.reasons[r.reason.value] += 1
        if can_replay(r, self.now) and r.replay_deadline_ms - self.now < _WARN_WITHIN_MS:
            self.soon += 1
        if r.dead_lettered_ms + self.retention_ms - self.now < _WARN_WITHIN_MS:
            self.pruned_soon += 1

    def warn(self) -> None:
        if self.soon:
            err.print(
                f"warning: {plural(self.soon, 'dead letter')} pass their replay deadline "
                "within 24 h; replay or export them now",
                markup=False,
            )
        if self.pruned_soon:
            err.print(
                f"warning: {plural(self.pruned_soon, 'dead letter')} reach the retention limit "
                f"({self.retention_days:g} days) within 24 h; export them to keep a copy",
                markup=False,
            )


@dead_letters.command("show")
@click.argument("dl_id")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@destination_option()
@click.pass_context
@handle_errors
def show_command(ctx: click.Context, dl_id: str, as_json: bool, destination: str | None) -> None:
    """Show everything recorded about a dead letter, and a curl that reproduces it.

    DL_ID is an event id (every dead letter with that id is shown, in every destination
    unless --destination names some) or a key name:id.

    \b
    Examples:
      capi dead-letters show order-1042
      capi dead-letters show order-1042 --destination default
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)
    selection = Selection(ids=[dl_id], destinations=names)
    records, unreadable = run(select_with_unreadable(settings, selection))
    named = [u for u in unreadable if dl_id in (u.key, u.id)]
    for u in named:
        err.print(f"dead letter {u.key} cannot be read ({u.why}); as stored:", markup=False)
        sys.stdout.buffer.write(u.raw + b"\n")
    warn_unreadable([u for u in unreadable if u not in named])
    if not records and not named:
        fail(
            f"no dead letter with id or key {dl_id!r} (see capi dead-letters list)",
            ExitCode.NOT_FOUND,
        )
    try:
        configured = destinations.parse_file(settings)
    except ConfigError:  # a broken file: the curl falls back to the CAPI_* settings
        configured = {}
    for i, r in enumerate(records):
        if as_json:
            print_json(r.model_dump(mode="json"))
        else:
            text = _describe(r, settings, configured.get(r.destination))
            out.print(("\n" + "-" * 60 + "\n" if i else "") + text, markup=False)


def _describe(r: DeadLetter, settings: Settings, dest: Destination | None) -> str:
    now = now_ms()
    one = safetext.shown  # one line of outside text, made inert
    lines = [
        f"id:               {one(r.id)} ({one(r.event_type)}; key {one(r.key)})",
        f"reason:           {r.reason.value}: {r.meaning}",
        f"status:           {r.status if r.status is not None else '(no HTTP response)'}",
        f"API error:        {one(r.error_message or '-')}" + one(_code_and_param(r)),
        "request ids:      " + one(", ".join(f"{k}={v}" for k, v in r.request_ids.items()) or "-"),
        f"attempts:         {r.attempts}",
        f"first attempt:    {r.first_attempt_at or '-'}",
        f"last attempt:     {r.last_attempt_at or '-'}",
        f"dead-lettered:    {r.dead_lettered_at}",
        f"destination:      {one(r.destination)}",
        f"key:              {r.key_fingerprint}   pixel: {one(r.pixel_id)}",
        f"replay deadline:  {r.replay_deadline} "
        + (
            f"({human_duration(r.replay_deadline_ms - now)} left)"
            if can_replay(r, now)
            else "(cannot be replayed)"
        ),
        "",
        "Guidance:",
        r.guidance,
        "",
        "Event as sent:",
        orjson.dumps(r.event, option=orjson.OPT_INDENT_2).decode(),
    ]
    if r.error_body is not None:
        lines += ["", "API response body:", orjson.dumps(r.error_body).decode()]
    key, env_file = key_expression(settings, dest.key_source if dest is not None else "")
    where = f"{key}, set from {env_file} in a subshell" if env_file else key
    lines += [
        "",
        f"Reproduce (validate_only; the key is read from {where}; never shown):",
        curl_for(r, dest.base_url if dest is not None else settings.base_url, key, env_file),
    ]
    return safetext.shown("\n".join(lines), lines=True)  # guidance, the event and body as received


def _code_and_param(r: DeadLetter) -> str:
    bits = [
        f"{name} {value}"
        for name, value in (("code", r.error_code), ("param", r.error_param))
        if value is not None
    ]
    return f" ({', '.join(bits)})" if bits else ""


@dead_letters.command("replays")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per audit entry.")
@click.option("--limit", default=20, show_default=True, help="Newest entries to show.")
@destination_option()
@click.pass_context
@handle_errors
def replays_command(
    ctx: click.Context, /, as_json: bool, limit: int, destination: str | None
) -> None:
    """Show the audit log of replays, purges and the console's key checks: when, what was
    selected, what was done, by whom (cli:user@host, or a console token's fingerprint).

    A replay with "started" and no "completed" entry was interrupted: run it again. Each
    destination keeps its own log; all are shown unless --destination names some.

    \b
    Example:
      capi dead-letters replays --limit 5
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)

    async def go() -> list[bytes]:
        client = redis_client(settings)
        rows: list[bytes] = []
        try:
            for name in names:
                keys = settings.keys.for_destination(name)
                rows += await aw(client.lrange(keys.replays, 0, limit - 1))
            return rows
        finally:
            await client.aclose()

    entries = sorted(
        (orjson.loads(raw) for raw in run(go())), key=lambda e: e["at_ms"], reverse=True
    )[:limit]
    if not entries:
        out.print("No replays yet.")
    for entry in entries:
        if as_json:
            print_json(entry)
            continue
        when = datetime.fromtimestamp(entry["at_ms"] / 1000, UTC).isoformat(timespec="seconds")
        by = f"  by {entry['by']}" if entry.get("by") else ""
        if entry.get("action") == "key check":  # asked for on the console: it releases a hold
            out.print(f"{when}  {entry['status']:<11} {entry.get('reason', '')}{by}", markup=False)
            continue
        if entry["status"] == "completed":
            counts = (
                f"replayed {entry.get('replayed')}, past deadline {entry.get('expired')}, "
                f"already gone {entry.get('already_gone')}"
            )
        elif entry["status"] == "purged":
            counts = f"purged {entry.get('purged')} of {entry['selected']} selected"
        else:
            counts = f"{entry['selected']} selected"
        out.print(
            f"{when}  {entry['status']:<9} {counts}  selection: "
            f"{_selection(entry['selection'])}{by}",
            markup=False,
        )


def _selection(selection: dict[str, Any]) -> str:
    """An audit entry's selection as ``reasons=missing_scope since=...``, or ``all``."""
    parts = []
    for name, value in selection.items():
        if name.endswith("_ms") and isinstance(value, int):
            parts.append(f"{name.removesuffix('_ms')}={iso(value)}")
        elif isinstance(value, list):
            parts.append(f"{name}={','.join(map(str, value))}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts) or "all"


@dead_letters.command("export")
@click.argument("ids", nargs=-1)
@filters
@click.option("-o", "--output", type=PrivateFile(), default="-", help="File (default stdout).")
@click.pass_context
@handle_errors
def export_command(
    ctx: click.Context, /, ids: tuple[str, ...], output: IO[bytes], **kw: Any
) -> None:
    """Write the selected dead letters as JSON Lines (for support tickets or archives).

    \b
    Example:
      capi dead-letters export --reason missing_scope -o scope-failures.jsonl
    """
    settings = settings_from(ctx)
    selection = selection_from(ids, kw, now_ms())

    # The bar's total is what the time indexes hold in the range: the filters may select
    # fewer.
    total = run(indexed(settings, selection)) if output is not sys.stdout.buffer else 0

    async def go(step: Callable[[int], None]) -> tuple[int, list[Unreadable]]:
        # Written as read, a slice at a time: never every record in memory at once.
        unreadable: list[Unreadable] = []
        count = 0
        async for r in iter_selected(settings, selection, unreadable):
            output.write(replay.to_json_line(r))
            count += 1
            step(1)
        return count, unreadable

    with progress(total, "exporting") as step:
        count, unreadable = run(go(step))
    warn_unreadable(unreadable)
    err.print(f"exported {plural(count, 'dead letter')}", markup=False)


@dead_letters.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Select every dead letter.")
@filters
@click.option("--export", "export_to", type=PrivateFile(), help="Write them here first.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@handle_errors
def purge_command(
    ctx: click.Context,
    /,
    ids: tuple[str, ...],
    select_all: bool,
    export_to: IO[bytes] | None,
    yes: bool,
    **kw: Any,
) -> None:
    """Delete dead letters for good (export them first with --export).

    \b
    Example:
      capi dead-letters purge --expired --export expired.jsonl --yes
    """
    settings = settings_from(ctx)
    selection = selection_from(ids, kw, now_ms())
    filtered = dataclasses.replace(selection, destinations=[]).describe()
    if not (ids or select_all or filtered):
        raise click.UsageError("say what to purge: IDs, --all, or a filter such as --expired")

    def export(record: DeadLetter) -> None:
        if export_to is not None:
            export_to.write(replay.to_json_line(record))

    # Each record is exported as it is read; only its outline is kept for the purge.
    found, unreadable = run(select_outlines(settings, selection, export))
    if export_to is not None:
        export_to.flush()
    # An unreadable record goes only when named: filters cannot read what it holds.
    named = [u for u in unreadable if u.key in ids or u.id in ids]
    warn_unreadable([u for u in unreadable if u not in named])
    records: list[Outline | Unreadable] = [*found, *named]
    report_not_found(ids, records)
    if not records:
        out.print("Nothing to purge.")
        return
    if not yes and not click.confirm(f"Delete {plural(len(records), 'dead letter')}?", err=True):
        out.print("Nothing deleted.")
        return

    async def go() -> int:
        client = redis_client(settings)
        groups: dict[str, list[Outline | Unreadable]] = {}
        for r in records:
            groups.setdefault(r.destination, []).append(r)
        actor = cli_actor()
        try:
            removed = 0
            for name, group in groups.items():
                keys = settings.keys.for_destination(name)
                removed += await replay.purge(client, keys, group, actor=actor, selection=selection)
            return removed
        finally:
            await client.aclose()

    out.print(f"purged {plural(run(go()), 'dead letter')}")
