"""``capi dead-letters replay``: put dead-lettered events back on the queue, or dry-run them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from capi import destinations, replay
from capi.cli.common import (
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
from capi.cli.deadletter_commands import dead_letters
from capi.cli.selection import (
    destination_names,
    filters,
    now_ms,
    report_not_found,
    select_outlines,
    select_records,
    selection_from,
    warn_unreadable,
)
from capi.client import ConversionsClient
from capi.deadletters import DeadLetter, Outline
from capi.errors import ConfigError
from capi.exitcodes import ExitCode, for_reason
from capi.failures import Reason
from capi.replay import Selection, can_replay
from capi.settings import Settings

R = TypeVar("R", DeadLetter, Outline)


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Select every dead letter.")
@filters
@click.option("--rate", type=float, default=None, help="At most N events per second.")
@click.option("--dry-run", is_flag=True, help="Ask the API (validate_only); queue nothing.")
@click.option("--include-expired", is_flag=True, help="Also try events past their deadline.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@handle_errors
def replay_command(
    ctx: click.Context,
    /,
    ids: tuple[str, ...],
    select_all: bool,
    rate: float | None,
    dry_run: bool,
    include_expired: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Put dead-lettered events back on the queue, once their cause is fixed.

    Same event ids, so the API dedups; each dead letter is removed only once its event is
    queued, so running the same replay again sends nothing twice and resumes an
    interrupted one. Events past their replay deadline are skipped and reported.

    The exit code is 7 when an id named matches no dead letter, and, with --dry-run, 4
    when the API would reject some of the events; when it could not check them (a key
    failure, a 5xx, a 429, a lost answer: 'not checked'), the code `capi check-key` exits
    with for that failure (3, 10-15).

    \b
    Examples:
      capi dead-letters replay order-1042 --dry-run
      capi check-key && capi dead-letters replay --reason missing_scope
      capi dead-letters replay --all --rate 200
    """
    settings = settings_from(ctx)
    now = now_ms()
    selection = selection_from(ids, kw, now)
    filtered = dataclasses.replace(selection, destinations=[]).describe()
    if not (ids or select_all or filtered):
        raise click.UsageError("say what to replay: IDs, --all, or a filter such as --reason")
    if dry_run:
        records = run(select_records(settings, selection))
        missing = report_not_found(ids, records)
        rejected, unchecked = _dry_run(settings, records, as_json, include_expired)
        _exit_if(missing, rejected)
        _exit_if_unchecked(unchecked)
        return
    # A replay needs only each record's key and deadline (Redis holds the events).
    outlines, unreadable = run(select_outlines(settings, selection))
    warn_unreadable(unreadable)
    missing = report_not_found(ids, outlines)
    with progress(len(outlines), "replaying") as advance:
        report = run(_replay(settings, outlines, rate, include_expired, selection, advance))
    if as_json:
        print_json(
            {
                "selected": report.selected,
                "replayed": report.replayed,
                "already_gone": report.already_gone,
                "expired": report.expired,
            }
        )
        return
    out.print(
        f"replayed {report.replayed} of {report.selected} selected "
        f"({report.already_gone} already replayed, {len(report.expired)} past deadline)"
    )
    for dl_id in report.expired:
        err.print(
            f"skipped {dl_id}: past its replay deadline (--include-expired to try)", markup=False
        )
    _exit_if(missing, 0)


def _exit_if(missing: list[str], rejected: int) -> None:
    """Exit non-zero when an id named matched nothing (7), or when a dry run found events
    the API would reject (4); 0 otherwise."""
    if missing:
        fail(
            f"{plural(len(missing), 'id')} named matched no dead letter: {', '.join(missing)}",
            ExitCode.NOT_FOUND,
        )
    if rejected:
        fail(
            f"{rejected} of the selected events would be rejected by the API (see above); "
            "fix their cause before replaying them",
            ExitCode.REFUSED,
        )


def _exit_if_unchecked(unchecked: list[replay.DryRunResult]) -> None:
    """Exit with the code of the failure (as ``capi check-key`` would) when the API did not
    judge some events: a 5xx, a 429, a lost answer or a key failure is not a rejection."""
    if not unchecked:
        return
    reason = Reason(unchecked[0].reason or Reason.UNEXPECTED.value)
    fail(
        f"{len(unchecked)} of the selected events could not be checked: the API answered "
        f"{reason.value} ({unchecked[0].message}), which says nothing about the events; "
        "run `capi check-key`, then the dry run again",
        for_reason(reason),
    )


async def _replay(
    settings: Settings,
    records: list[Outline],
    rate: float | None,
    include_expired: bool,
    selection: Selection,
    advance: Callable[[int], None],
) -> replay.ReplayReport:
    """Replay each record to its own destination's queue; one report for all."""
    client = redis_client(settings)
    total = replay.ReplayReport(selected=len(records))
    actor = cli_actor()
    try:
        # Nothing selected still leaves an audit entry (in the first destination's log).
        groups = _by_destination(records) or {
            (selection.destinations or destination_names(settings, None))[0]: []
        }
        for name, group in groups.items():
            report = await replay.replay(
                client,
                settings.keys.for_destination(name),
                group,
                rate_per_s=rate,
                include_expired=include_expired,
                selection=selection,
                progress=advance,
                actor=actor,
            )
            total.replayed += report.replayed
            total.already_gone += report.already_gone
            total.expired += report.expired
    finally:
        await client.aclose()
    return total


def _by_destination(records: list[R]) -> dict[str, list[R]]:
    groups: dict[str, list[R]] = {}
    for r in records:
        groups.setdefault(r.destination, []).append(r)
    return groups


def _dry_run(
    settings: Settings, records: list[DeadLetter], as_json: bool, include_expired: bool
) -> tuple[int, list[replay.DryRunResult]]:
    """Ask the API about each record (validate_only); print each verdict; the number that
    would be rejected, and the results the API did not judge."""
    now = now_ms()
    send: list[DeadLetter] = []
    skipped: list[replay.DryRunResult] = []
    for r in records:  # one pass: a membership test per record was quadratic (50,000: hours)
        if include_expired or can_replay(r, now):
            send.append(r)
        else:
            skipped.append(
                replay.DryRunResult(
                    r.id, False, "past_replay_deadline", "not sent: the API refuses it"
                )
            )
    configured = destinations.load(settings) if send else {}

    async def go() -> list[replay.DryRunResult]:
        results: list[replay.DryRunResult] = []
        for name, group in _by_destination(send).items():
            dest = configured.get(name)
            if dest is None:
                raise ConfigError(f"destination {name!r} is no longer configured")
            async with ConversionsClient.for_destination(dest) as client:
                results += await replay.dry_run(client, group)
        return results

    results = (run(go()) if send else []) + skipped
    for res in results:
        if as_json:
            print_json(
                {
                    "id": res.id,
                    "accepted": res.accepted,
                    "checked": res.checked,
                    "reason": res.reason,
                    "message": res.message,
                }
            )
        else:
            out.print(f"{res.id}: {_verdict(res)}", markup=False)
    accepted = sum(r.accepted for r in results)
    unchecked = [r for r in results if not r.checked]
    rejected = len(results) - accepted - len(unchecked)
    if not as_json:
        out.print(
            f"dry run: {accepted} would be accepted, {rejected} rejected"
            + (f", {len(unchecked)} not checked" if unchecked else "")
            + "; nothing was queued"
        )
    return rejected, unchecked


def _verdict(res: replay.DryRunResult) -> str:
    if res.accepted:
        return "would be accepted"
    return f"{'rejected' if res.checked else 'not checked'}: {res.reason}: {res.message}"
