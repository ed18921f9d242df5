"""``capi enqueue`` and ``capi status``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO, Any

import click
from rich.markup import escape
from rich.progress import Progress

from capi import coverage, destinations
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
from capi.cli.selection import destination_names, destination_option
from capi.constants import MAX_EVENT_BYTES
from capi.errors import EventRejected, Problem, QueueUnavailable
from capi.exitcodes import ExitCode
from capi.producer import EnqueueReport, SyncProducer
from capi.settings import Settings
from capi.status import destination_status, shared_status

_CHUNK = 500
_CHUNK_BYTES = 4 * 1024 * 1024  # of JSON per bulk call, so memory stays near the input's
_SKIP_BYTES = 64 * 1024
_NOTHING = object()  # not an event: a blank or refused line (a line may hold JSON null)


@cli.command("enqueue")
@click.argument("file", type=click.File("rb"), default="-")
@click.option(
    "--destination",
    metavar="NAME[,NAME...]",
    help="Where the events go; several names fan out (one copy each). Needed only when "
    "more than one destination is configured.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@handle_errors
def enqueue_command(
    ctx: click.Context, file: IO[bytes], destination: str | None, as_json: bool
) -> None:
    """Validate and enqueue events from JSON Lines (FILE, or stdin).

    One event per line in the API's format; raw identifiers may be given under ``user``
    (email, phone, external_id, first_name, last_name) and are hashed before queueing.
    Each refused line is reported with its reason and the others are queued; the exit code
    is 4 if any was refused. An invalid optional identifier (a bad phone beside a good
    email, say) is left out and reported as a warning (CAPI_STRICT_IDENTIFIERS=true refuses
    the line instead); a line whose "consent" is "denied" is skipped under the destination's
    consent_policy "drop" (never stored) or sent opted out under "opt_out". A line is
    refused if it is longer than 256 KiB (it is never read whole), is not UTF-8 JSON, or
    repeats a key within one object.

    \b
    Example (one purchase, timestamped now):
      printf '%s' '{"id":"o-1","type":"order_created","timestamp_ms":'"$(date +%s000)"',' \\
        '"action_source":"web","source_url":"https://shop.example/thanks",' \\
        '"user":{"email":"ada@example.com"},' \\
        '"data":{"type":"contents","amount":12999,"currency":"USD"}}' | capi enqueue
    """
    settings = settings_from(ctx)  # the producer warns when the Redis is the default
    names = destination_names(settings, destination) if destination else None
    if names is None and len(destinations.names(settings)) > 1:
        raise click.UsageError(
            "several destinations are configured: name one or more with --destination "
            "(see capi destinations)"
        )
    total = EnqueueReport()
    lines_read = 0
    with (
        _say_how_far(total),
        SyncProducer.from_settings(settings) as producer,
        _file_progress(file) as advance,
    ):
        batch: list[tuple[int, Any]] = []
        batch_bytes = 0
        for lineno, line, size in read_lines(file, MAX_EVENT_BYTES):
            lines_read = lineno
            advance(size)
            parsed = _parse_line(lineno, line, total)
            if parsed is not _NOTHING:
                batch.append((lineno, parsed))
                batch_bytes += size
            if len(batch) >= _CHUNK or batch_bytes >= _CHUNK_BYTES:
                _flush(producer, batch, total, names)
                batch_bytes = 0
        _flush(producer, batch, total, names)
    for lineno, exc in sorted(total.refused, key=lambda r: r[0]):
        err.print(f"line {lineno}: {exc}", markup=False)
    for lineno, problems in sorted(total.warnings.items()):
        for p in problems:
            err.print(f"line {lineno}: warning: {p.path}: left out: {p.rule}", markup=False)
    skipped = {n: why for n, why in total.skipped.items() if n not in total.added}
    for lineno, problems in sorted(total.skipped.items()):
        what = "skipped" if lineno in skipped else "warning"
        for p in problems:
            err.print(f"line {lineno}: {what}: {p.rule}", markup=False)
    summary = {
        "lines": lines_read,
        "queued": total.queued,
        "duplicates": total.duplicates,
        "refused": len(total.refused),
        "warned": len(total.warnings),
        "skipped": len(skipped),
    }
    if as_json:
        print_json(summary)
    else:
        out.print(
            f"queued {total.queued}, duplicates {total.duplicates} (already queued), "
            f"refused {len(total.refused)}, warned {len(total.warnings)} (identifiers left "
            f"out), skipped {len(skipped)} (consent denied)"
        )
    if total.refused:
        sys.exit(ExitCode.REFUSED)


@contextlib.contextmanager
def _file_progress(file: IO[bytes]) -> Iterator[Callable[[int], None]]:
    """A byte-based progress bar for a regular file on a terminal; nothing otherwise."""
    try:
        size = os.fstat(file.fileno()).st_size if os.path.isfile(file.name) else 0
    except (AttributeError, OSError, TypeError, ValueError):
        size = 0
    if not size or not err.is_terminal:
        yield lambda n: None
        return
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("enqueueing", total=size)
        yield lambda n: bar.advance(task, n)


def read_lines(file: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line, size) for each line, never holding more than ``limit`` + 1 bytes
    of one: a longer line is read through to its end in pieces and given as None."""
    lineno = 0
    while line := file.readline(limit + 1):
        lineno += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield lineno, line, len(line)
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := file.readline(_SKIP_BYTES)):
            size += len(line)
        yield lineno, None, size


def _parse_line(lineno: int, line: bytes | None, report: EnqueueReport) -> Any:
    """The value on one line, or _NOTHING for a blank line or a refused one (recorded)."""
    if line is None:
        why = f"is longer than {MAX_EVENT_BYTES // 1024} KiB; at most that per event"
    elif not line.strip():
        return _NOTHING
    else:
        try:
            return parse_json(line)
        except _Refused as exc:
            why = str(exc)
    report.refused.append((lineno, EventRejected([Problem("(line)", why)])))
    return _NOTHING


class _Refused(ValueError):
    """A line that is not one JSON document capi can read unambiguously."""


def parse_json(line: bytes) -> Any:
    """Parse one JSON line strictly: UTF-8, no NaN/Infinity, and no key twice in an object
    (a JSON parser keeps only one of them, so a second ``"user": {}`` would drop the first)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("is not UTF-8") from None
    if text.count("[") + text.count("{") > MAX_BRACKETS and _depth(text) > MAX_DEPTH:
        # Refused before the recursive parser meets it: deep recursion is not only slow, it
        # leaves no stack for anything else that runs meanwhile (a finalizer, a log hook).
        raise _Refused("nests too deeply to parse")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Refused:
        raise
    except RecursionError:
        raise _Refused("nests too deeply to parse") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer of over 4300 digits
        raise _Refused(f"is not valid JSON ({str(exc).partition(':')[0][:80]})") from None


# A line with more brackets than this has its nesting measured before it is parsed; one
# nested deeper than MAX_DEPTH is refused (events nest a few levels; capi.jsondata refuses
# data deeper than 32 anyway).
MAX_BRACKETS = 256
MAX_DEPTH = 64


def _depth(text: str) -> int:
    """The deepest nesting of brackets outside strings, found without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"repeats the key {key[:40]!r} in one object; give each key once")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"is not valid JSON ({name} is not a JSON number)")


@contextlib.contextmanager
def _say_how_far(total: EnqueueReport) -> Iterator[None]:
    """If Redis fails part-way through a file, say how many lines were queued before."""
    try:
        yield
    except QueueUnavailable as exc:
        if not total.queued:
            raise
        raise type(exc)(
            f"{exc} Before that, {total.queued} events of this input were queued; running "
            "the same command again is safe (the event id dedups)."
        ) from None


def _flush(
    producer: SyncProducer,
    batch: list[tuple[int, Any]],
    total: EnqueueReport,
    names: list[str] | None,
) -> None:
    if not batch:
        return
    report = producer.enqueue_many((event for _, event in batch), destination=names)
    total.queued += report.queued
    total.duplicates += report.duplicates
    total.refused += [(batch[i][0], exc) for i, exc in report.refused]
    for i, flag in report.added.items():
        total.added[batch[i][0]] = flag
    total.warnings.update((batch[i][0], w) for i, w in report.warnings.items() if w)
    total.skipped.update((batch[i][0], why) for i, why in report.skipped.items())
    batch.clear()


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@destination_option()
@click.pass_context
@handle_errors
def status_command(ctx: click.Context, as_json: bool, destination: str | None) -> None:
    """Queue depth, in flight, retries, counters, dead letters by reason, key state,
    the endpoint, Redis memory, and each live worker with what it is doing.

    With several destinations, one section each (``--json``: under ``destinations``).

    \b
    Example:
      capi status --json | jq .key
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)
    statuses = run(_statuses(settings, names))
    if len(names) == 1:
        status = {"destination": names[0], **statuses[names[0]]}
        if as_json:
            print_json(status)
        else:
            _print_status(status)
        return
    if as_json:
        first = statuses[names[0]]
        print_json(
            {
                "destinations": statuses,
                "workers": first["workers"],
                "workers_alive": first["workers_alive"],
                "redis": first["redis"],
            }
        )
        return
    for i, name in enumerate(names):
        out.print(("\n" if i else "") + f"[bold]destination {escape(name)}[/]")
        _print_status(statuses[name], workers=i == len(names) - 1)


def _print_status(status: dict[str, Any], *, workers: bool = True) -> None:
    key = status["key"]
    counters = status["counters"]
    oldest = status["oldest_queued_age_s"]
    out.print(
        f"queued:        {status['queued']}"
        + (f" (oldest {oldest} s)" if oldest is not None else "")
    )
    out.print(f"in flight:     {status['in_flight']}")
    out.print(f"retries:       {status['retry_batches_scheduled']} batches scheduled")
    for name in ("enqueued", "delivered", "retried", "dead_lettered", "transient_key_failures"):
        out.print(f"{name + ':':<15}{counters.get(name, 0)}")
    if counters.get("accepted_mismatches"):
        out.print(
            f"accepted_events mismatches: {counters['accepted_mismatches']} batches answered 200 "
            "with a count differing from the events sent (see the worker log)"
        )
    reasons = ", ".join(f"{k} {v}" for k, v in status["dead_letters_by_reason"].items())
    out.print(f"dead letters:  {status['dead_letters']} now")
    if reasons:
        out.print(f"  all time, by reason (replayed and purged included): {reasons}")
    line = f"key:           {key.get('state')}"
    if key.get("state") == "held":
        line += f" since {key.get('since')} ({key.get('reason')})"
    out.print(line)
    if workers:
        out.print(f"workers alive: {len(status['workers'])}")
        for w in status["workers"]:
            where = f" [{w['destination']}]" if w.get("destination") else ""
            out.print(f"  {w['name']}{where}: {w['state']} ({w['detail']})", markup=False)
    endpoint = status["endpoint"]
    if endpoint["state"] == "failing":
        out.print(
            f"endpoint:      failing since {endpoint['failing_since']} "
            f"(last error {endpoint['last_error']})",
            markup=False,
        )
    else:
        out.print(f"endpoint:      ok (last delivery {endpoint['last_ok_at'] or 'none yet'})")
    mem = status["redis"]
    if mem["role"] == "slave":
        out.print(
            "redis:         READ-ONLY: CAPI_REDIS_URL points at a replica (after a failover?); "
            "producers are refused and workers wait until it is a primary again",
            markup=False,
        )
    if mem["full"]:
        out.print(
            f"redis:         FULL: {mem['used_memory']} of maxmemory {mem['maxmemory']} bytes "
            f"under {mem['maxmemory_policy']}; producers are refused until workers drain it "
            "or maxmemory is raised",
            markup=False,
        )
    if key.get("state") == "held":
        out.print(key.get("guidance", ""), markup=False)
    if warning := coverage.weak_warning(status["match_coverage"]):
        out.print(warning, markup=False)


@cli.command("health")
@click.option("--url", help="Check this endpoint instead (e.g. a worker's /readyz).")
@click.pass_context
@handle_errors
def health_command(ctx: click.Context, url: str | None) -> None:
    """Exit 0 when capi is ready, 1 otherwise (for Docker and Kubernetes probes).

    Without --url: Redis answers, the key is not held, and a worker sent a heartbeat in
    the last 30 s.

    \b
    Examples:
      capi health --url http://127.0.0.1:9464/readyz   # a worker run with --metrics-port 9464
      capi health
    """
    if url:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (operator's URL)
                ok, why = resp.status == 200, f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            ok, why = False, str(exc)
    else:
        settings = settings_from(ctx)
        statuses = run(_statuses(settings, destination_names(settings, None)))
        held = [n for n, st in statuses.items() if st["key"].get("state") == "held"]
        alive = next(iter(statuses.values()))["workers_alive"]
        # As /readyz: ready while some destination can send; the held ones are named.
        ok = bool(alive) and len(held) < len(statuses)
        if not alive:
            why = "no live worker"
        elif held:
            names = "" if held == ["default"] else " (" + ", ".join(held) + ")"
            why = ("key held" if not ok else "ok, but a key is held") + names
        else:
            why = "ok"
    out.print(("ok: " if ok else "not ready: ") + why, markup=False)
    sys.exit(ExitCode.OK if ok else ExitCode.FAILURE)


async def _statuses(settings: Settings, names: list[str]) -> dict[str, dict[str, Any]]:
    client = redis_client(settings)
    try:
        shared = await shared_status(client, settings.keys)
        return {
            n: {**await destination_status(client, settings.keys.for_destination(n)), **shared}
            for n in names
        }
    finally:
        await client.aclose()
