"""``capi destinations``: every destination with its pixel, key and queue, at a glance."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from capi import destinations
from capi.cli.common import (
    err,
    handle_errors,
    out,
    print_json,
    redis_client,
    run,
    settings_from,
)
from capi.cli.main import cli
from capi.destinations import Destination
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.fingerprint import fingerprint
from capi.safetext import shown
from capi.settings import Settings
from capi.status import destination_status, destinations_in_redis, stranded


@cli.command("destinations")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per destination.")
@click.pass_context
@handle_errors
def destinations_command(ctx: click.Context, as_json: bool) -> None:
    """List the destinations: pixel, key fingerprint, key state, queue, counts, last error.

    The key state is ok, held (see capi status), confirming (a probe met a key problem
    and more probes are deciding whether to hold it) or unchecked (no worker has checked
    it yet). match_coverage (--json) is the share of the events delivered in the last 24
    hours that carried each identifier kind (docs/attribution.md); match_coverage_events
    how many that was. Without a destinations file the one destination is "default". A
    destination removed from the file whose events or dead letters are still in Redis is
    listed too, as removed (configured: false): add it back to the file to send them. A
    broken destinations file is reported on top, and the destinations Redis holds are listed
    all the same (configured: null, exit code 3).

    \b
    Examples:
      capi destinations
      capi destinations --json | jq -r 'select(.key_state == "held") | .name'
    """
    settings = settings_from(ctx)
    file_error = None
    try:
        configured: dict[str, Destination] | None = destinations.parse_file(settings)
    except ConfigError as exc:
        file_error, configured = str(exc), None
        err.print(
            f"error: the destinations file is broken: {exc}\n"
            "Running workers keep the destinations they had. What Redis holds:",
            markup=False,
        )
    rows = run(_rows(settings, configured))
    if as_json:
        for row in rows:
            print_json(row)
    else:
        _print_table(rows)
    if file_error:
        sys.exit(ExitCode.CONFIG)


def _print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a table that fits 80 columns: names and pixels fold rather than being
    cut, the key is its last four characters (the whole fingerprint is in --json), and
    each last error is a line of its own under the table."""
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False)
    for header in ("name", "pixel"):
        table.add_column(header, overflow="fold")
    table.add_column("key", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for header in ("queued", "oldest", "delivered", "dead\nletters"):
        table.add_column(header, justify="right", no_wrap=True, max_width=12)
    for r in rows:
        oldest = r["oldest_queued_age_s"]
        table.add_row(
            Text(shown(r["name"])),
            Text(shown(r["pixel_id"] or "-")),
            Text(_short(r["key_fingerprint"])),
            r["key_state"] if r["configured"] is not False else "removed",
            str(r["queued"]),
            "-" if oldest is None else f"{oldest:.0f} s",
            str(r["delivered"]),
            str(r["dead_letters"]),
        )
    out.print(table)
    errors = [(r["name"], r["last_error"]) for r in rows if r["last_error"]]
    if errors:
        out.print("\nlast errors:")
    for name, error in errors:
        out.print(Text(f"  {shown(name)}: {shown(error)}"), soft_wrap=False)


def _short(key_fingerprint: str) -> str:
    """``…0001`` of ``…0001 (sha256:…)``; ``-`` for a key not set here."""
    if key_fingerprint.startswith("…"):
        return key_fingerprint.split(" ", maxsplit=1)[0]
    return "-" if key_fingerprint in ("(not set)", "-") else key_fingerprint


async def _rows(
    settings: Settings, configured: dict[str, Destination] | None
) -> list[dict[str, Any]]:
    """A row per configured destination and per one left behind in Redis; with no readable
    file (``configured`` None), a row per destination Redis holds, configured unknown."""
    client = redis_client(settings)
    try:
        if configured is None:
            names = await destinations_in_redis(client, settings.keys) or ["default"]
            return [
                _row(n, status, status["key"].get("state", "unchecked"), configured=None)
                for n in names
                if (status := await destination_status(client, settings.keys.for_destination(n)))
            ]
        rows = []
        for name, dest in configured.items():
            status = await destination_status(client, settings.keys.for_destination(name))
            key = status["key"]
            state = key.get("state", "unchecked")
            current = fingerprint(dest.api_key) if dest.api_key else None
            if state != "confirming" and current and key.get("fingerprint") != current:
                state = "unchecked"  # never checked, or checked with another key
            rows.append(
                _row(name, status, state)
                | {
                    "pixel_id": dest.pixel_id,
                    "key_fingerprint": fingerprint(dest.api_key) if dest.api_key else "(not set)",
                    "key_source": dest.key_source,
                    "base_url": dest.base_url,
                    "integration_source": dest.integration_source,
                    "validate_only": dest.validate_only,
                }
            )
        for name, status in (await stranded(client, settings.keys, configured)).items():
            rows.append(_row(name, status, "unchecked", configured=False))
        return rows
    finally:
        await client.aclose()


def _row(
    name: str, status: dict[str, Any], state: str, *, configured: bool | None = True
) -> dict[str, Any]:
    key = status["key"]
    last_error = None
    if configured is False:
        last_error = (
            "not in the destinations file: add it back to send its events, or drop them: "
            f"capi queue purge --destination {name}"
        )
    elif state == "held":
        last_error = f"key held: {key.get('reason')}"
    elif state == "confirming":
        last_error = f"key problem being confirmed: {key.get('confirming_reason')}"
    elif status["endpoint"]["state"] == "failing":
        last_error = status["endpoint"]["last_error"]
    return {
        "name": name,
        "configured": configured,
        "pixel_id": None,
        "key_fingerprint": key.get("fingerprint") or "-",
        "key_source": None,
        "base_url": None,
        "integration_source": None,
        "validate_only": False,
        "key_state": state,
        "queued": status["queued"],
        "in_flight": status["in_flight"],
        "retry_batches_scheduled": status["retry_batches_scheduled"],
        "oldest_queued_age_s": status["oldest_queued_age_s"],
        "delivered": status["counters"].get("delivered", 0),
        "validated": status["counters"].get("validated", 0),
        "dead_letters": status["dead_letters"],
        "dead_lettered": status["counters"].get("dead_lettered", 0),
        "endpoint": status["endpoint"]["state"],
        "last_error": last_error,
        "match_coverage": status["match_coverage"]["shares"],
        "match_coverage_events": status["match_coverage"]["events"],
    }
