"""``capi queue purge``: empty a destination's queue (test events, say); dead letters stay."""

from __future__ import annotations

import click
from rich.markup import escape

from capi import destinations
from capi.cli.common import fail, handle_errors, out, plural, redis_client, run, settings_from
from capi.cli.main import cli
from capi.exitcodes import ExitCode
from capi.queue import Queue
from capi.settings import Settings
from capi.status import destination_status, stranded


@cli.group("queue")
def queue_group() -> None:
    """Act on the queue of events waiting to be sent (see capi status for its depth).

    \b
    Example:
      capi queue purge --destination default --yes
    """


@queue_group.command("purge")
@click.option(
    "--destination",
    metavar="NAME",
    help="The destination whose queue to empty (needed when several are configured; also "
    "one no longer configured that still holds events, as capi status lists them).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@handle_errors
def purge_command(ctx: click.Context, destination: str | None, yes: bool) -> None:
    """Delete the events waiting to be sent: queued ones and scheduled retries.

    For a queue of test events, or events that must never be sent. Events a worker has
    in flight finish; dead letters are not touched (capi dead-letters purge deletes
    those). This cannot be undone: the events are gone, not dead-lettered; the same
    events may be enqueued again (they are no longer duplicates).

    \b
    Example (asks first, unless --yes):
      capi queue purge --destination default --yes
    """
    settings = settings_from(ctx)
    name = run(_which(settings, destination))
    keys = settings.keys.for_destination(name)

    async def counts() -> tuple[int, int, int]:
        client = redis_client(settings)
        try:
            st = await destination_status(client, keys)
        finally:
            await client.aclose()
        return st["queued"], st["retry_batches_scheduled"], st["in_flight"]

    queued, retries, in_flight = run(counts())
    if not (queued or retries):
        out.print(f"Nothing queued for {escape(name)}.")
        return
    batches = f"{retries} scheduled retry batch" + ("" if retries == 1 else "es")
    what = f"{plural(queued, 'queued event')} and {batches}"
    if not yes and not click.confirm(
        f"Delete {what} of destination {name!r}? Dead letters are kept.", err=True
    ):
        out.print("Nothing deleted.")
        return

    async def purge() -> tuple[int, int]:
        client = redis_client(settings)
        try:
            return await Queue(client, keys).purge(settings.dedup_window_s)
        finally:
            await client.aclose()

    gone, retried = run(purge())
    line = f"purged {plural(gone, 'queued event')} and {plural(retried, 'event')} scheduled "
    line += f"for retry from {name}; dead letters untouched"
    if in_flight:
        line += f"; {plural(in_flight, 'event')} in flight were left to finish"
    out.print(line, markup=False)


async def _which(settings: Settings, destination: str | None) -> str:
    """The destination named (configured, or stranded with events), or the only one."""
    configured = destinations.names(settings)
    if destination is None:
        if len(configured) == 1:
            return configured[0]
        fail(
            "--destination: name the destination whose queue to empty; they are: "
            + ", ".join(configured),
            ExitCode.USAGE,
        )
    if destination in configured:
        return destination
    client = redis_client(settings)
    try:
        left = await stranded(client, settings.keys, configured)
    finally:
        await client.aclose()
    if destination not in left:
        fail(
            f"--destination: {destination[:64]!r} is not configured and holds nothing; the "
            "destinations are: " + ", ".join([*configured, *left]),
            ExitCode.USAGE,
        )
    return destination
