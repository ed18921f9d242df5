"""``capi enqueue``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import click
import redis.exceptions
from rich.progress import Progress

from capi import destinations
from capi.cli.common import (
    err,
    handle_errors,
    out,
    print_json,
    settings_from,
)
from capi.cli.main import cli
from capi.cli.selection import destination_names
from capi.constants import MAX_EVENT_BYTES
from capi.errors import CapiError, EventRejected, Problem, QueueUnavailable
from capi.events import Unreadable, prepare
from capi.exitcodes import ExitCode
from capi.producer import EnqueueReport, SyncProducer

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
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only validate: report each line as enqueue would, queue nothing, contact no Redis.",
)
@click.pass_context
@handle_errors
def enqueue_command(
    ctx: click.Context, file: IO[bytes], destination: str | None, as_json: bool, dry_run: bool
) -> None:
    """Validate and enqueue events from JSON Lines (FILE, or stdin).

    One event per line in the API's format; raw identifiers may be given under "user"
    (email, phone, external_id, first_name, last_name) and are hashed before queueing.
    Each refused line is reported with its reason and the others are queued; the exit code
    is 4 if any was refused. A line is refused if it is longer than 256 KiB (it is never read
    whole), is not UTF-8 JSON, or repeats a key within one object. An invalid optional
    identifier (a bad phone beside a good email, say) is left out and reported as a warning
    (CAPI_STRICT_IDENTIFIERS=true refuses the line instead); a line whose "consent" is
    "denied" is skipped under the destination's consent_policy "drop" (never stored) or
    sent opted out under "opt_out". With --dry-run the file
    is only checked: nothing is queued and Redis is not contacted (so duplicates of events
    already queued are not known).

    \b
    Example (one purchase, timestamped now, checked, then queued):
      printf '%s' '{"id":"o-1","type":"order_created","timestamp_ms":'"$(date +%s000)"',' \\
        '"action_source":"web","source_url":"https://shop.example/thanks",' \\
        '"user":{"email":"ada@example.com"},' \\
        '"data":{"type":"contents","amount":12999,"currency":"USD"}}' > events.jsonl
      capi enqueue --dry-run events.jsonl && capi enqueue events.jsonl
    """
    settings = settings_from(ctx)  # the producer warns when the Redis is the default
    names = destination_names(settings, destination) if destination else None
    if names is None and len(destinations.names(settings)) > 1:
        raise click.UsageError(
            "several destinations are configured: name one or more with --destination "
            "(see capi destinations)"
        )
    total = EnqueueReport()
    lines_read = [0]
    failure: CapiError | redis.exceptions.RedisError | None = None
    try:
        target: contextlib.AbstractContextManager[SyncProducer | _Validator] = (
            contextlib.nullcontext(_Validator(settings.strict_identifiers))
            if dry_run
            else SyncProducer.from_settings(settings)
        )
        with (
            _say_how_far(total),
            target as producer,
            _file_progress(file) as advance,
        ):
            _enqueue_lines(producer, file, advance, total, names, lines_read)
    except (CapiError, redis.exceptions.RedisError) as error:  # Redis away, full, ...
        failure = error
    for lineno, exc in sorted(total.refused, key=lambda r: r[0]):
        err.print(f"line {lineno}: {exc}", markup=False)
    skipped = _print_warnings(total)
    summary: dict[str, Any] = {
        "lines": lines_read[0],
        "queued": total.queued,
        "duplicates": total.duplicates,
        "refused": len(total.refused),
        "warned": len(total.warnings),
        "skipped": skipped,
    }
    if dry_run:
        summary |= {"dry_run": True, "queued": 0, "valid": total.queued}
    if as_json:  # whatever the exit: a script reads how far it got
        if failure is not None:
            summary["error"] = str(failure)
        print_json(summary)
    elif dry_run:
        out.print(
            f"dry run: {total.queued} valid, refused {len(total.refused)}; nothing was queued"
        )
    elif failure is None or total.queued or total.duplicates or total.refused:
        out.print(
            f"queued {total.queued}, duplicates {total.duplicates} (already queued), "
            f"refused {len(total.refused)}, warned {len(total.warnings)} (identifiers left "
            f"out), skipped {skipped} (consent denied)"
        )
    if failure is not None:
        raise failure  # handle_errors says it on stderr, with its exit code
    if total.refused:
        sys.exit(ExitCode.REFUSED)


def _enqueue_lines(
    producer: SyncProducer | _Validator,
    file: IO[bytes],
    advance: Callable[[int], None],
    total: EnqueueReport,
    names: list[str] | None,
    lines_read: list[int],
) -> None:
    """Read, check and enqueue FILE's lines in bulk calls, counting into ``total``."""
    batch: list[tuple[int, Any]] = []
    batch_bytes = 0
    for lineno, line, size in read_lines(file, MAX_EVENT_BYTES):
        lines_read[0] = lineno
        advance(size)
        parsed = _parse_line(lineno, line)
        if parsed is not _NOTHING:
            batch.append((lineno, parsed))
            batch_bytes += size
        if len(batch) >= _CHUNK or batch_bytes >= _CHUNK_BYTES:
            _flush(producer, batch, total, names)
            batch_bytes = 0
    _flush(producer, batch, total, names)


def _print_warnings(total: EnqueueReport) -> int:
    """Print each identifier left out and each consent skip by line; how many lines were
    skipped everywhere (a line skipped for one destination but queued to another is a
    warning there)."""
    for lineno, problems in sorted(total.warnings.items()):
        for p in problems:
            err.print(f"line {lineno}: warning: {p.path}: left out: {p.rule}", markup=False)
    skipped = 0
    for lineno, problems in sorted(total.skipped.items()):
        what = "warning" if lineno in total.added else "skipped"
        skipped += what == "skipped"
        for p in problems:
            err.print(f"line {lineno}: {what}: {p.rule}", markup=False)
    return skipped


class _Validator:
    """What ``enqueue --dry-run`` uses in place of a producer: the same checks and hashing
    (:func:`capi.events.prepare`), and no Redis. ``queued`` counts the valid events."""

    def __init__(self, strict_identifiers: bool) -> None:
        self.strict_identifiers = strict_identifiers

    def enqueue_many(
        self,
        events: Iterable[Any],
        destination: Any = None,
        *,
        report: EnqueueReport | None = None,
    ) -> EnqueueReport:
        report = EnqueueReport() if report is None else report
        for i, event in enumerate(events):
            try:
                prepared = prepare(event, strict_identifiers=self.strict_identifiers)
            except EventRejected as exc:
                report.refused.append((i, exc))
            except Exception as exc:  # a hostile line must cost only itself, as in enqueue
                why = f"could not be read as an event ({type(exc).__name__})"
                report.refused.append((i, EventRejected([Problem("(event)", why)])))
            else:
                report.queued += 1
                if prepared.warnings:
                    report.warnings[i] = list(prepared.warnings)
        return report


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


def _parse_line(lineno: int, line: bytes | None) -> Any:
    """The value on one line; _NOTHING for a blank line; for a line that is no JSON value,
    an :class:`Unreadable` that the producer refuses (and puts in ``capi tail``'s ring, as
    the intake's) saying why."""
    if line is None:
        why = f"is longer than {MAX_EVENT_BYTES // 1024} KiB; at most that per event"
    elif not line.strip():
        return _NOTHING
    else:
        if lineno == 1 and line.startswith(_BOM):  # the file's UTF-8 signature (Windows editors)
            line = line[len(_BOM) :]
        try:
            return parse_json(line)
        except _Refused as exc:
            return Unreadable(str(exc), "(line)", exc.kept)
    return Unreadable(why, "(line)")


_BOM = b"\xef\xbb\xbf"


class _Refused(ValueError):
    """A line that is not one JSON document capi can read unambiguously; ``kept`` says it
    without the input the message quotes (for the live-outcomes ring), when it quotes any."""

    def __init__(self, message: str, kept: str | None = None) -> None:
        super().__init__(message)
        self.kept = kept


def parse_json(line: bytes) -> Any:
    """Parse one JSON line strictly: UTF-8, no NaN/Infinity, and no key twice in an object
    (a JSON parser keeps only one of them, so a second ``"user": {}`` would drop the first)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise _Refused("starts with a byte order mark (U+FEFF), which only a file's start may have")
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
                raise _Refused(
                    f"repeats the key {key[:40]!r} in one object; give each key once",
                    "repeats a key in one object; give each key once",
                )
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
            "the same command again is safe (the event id dedups).",
            maybe_stored=exc.maybe_stored,
        ) from None


def _flush(
    producer: SyncProducer | _Validator,
    batch: list[tuple[int, Any]],
    total: EnqueueReport,
    names: list[str] | None,
) -> None:
    if not batch:
        return
    report = EnqueueReport()
    try:  # a call that fails part-way still counts what it queued
        producer.enqueue_many((event for _, event in batch), destination=names, report=report)
    finally:
        total.queued += report.queued
        total.duplicates += report.duplicates
        total.refused += [(batch[i][0], exc) for i, exc in report.refused]
        for i, flag in report.added.items():
            total.added[batch[i][0]] = flag
        total.warnings.update((batch[i][0], w) for i, w in report.warnings.items() if w)
        total.skipped.update((batch[i][0], why) for i, why in report.skipped.items())
        batch.clear()
