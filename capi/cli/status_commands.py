"""``capi status`` and ``capi health``: what the queue, the keys, the endpoint and the
workers are doing, told as it is (a broken destinations file, a destination no longer
configured that still holds events, no live worker to know the endpoint by)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import click
from rich.markup import escape

from capi import coverage, destinations
from capi.cli.common import fail, handle_errors, out, print_json, redis_client, run, settings_from
from capi.cli.main import cli
from capi.cli.selection import destination_names, destination_option
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.safetext import shown
from capi.settings import Settings
from capi.status import (
    cluster_confirming,
    confirming,
    destination_status,
    destinations_in_redis,
    shared_status,
    stranded,
)


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@destination_option()
@click.pass_context
@handle_errors
def status_command(ctx: click.Context, as_json: bool, destination: str | None) -> None:
    """Queue depth, in flight, retries, counters, dead letters by reason, key state,
    the endpoint, Redis memory, and each live worker with what it is doing.

    With several destinations, one section each (--json: under "destinations"); over
    20, their totals, then in full only those that need attention (a key held or being
    confirmed, a failing endpoint, dead letters, retries, events waiting over a minute,
    weak match coverage). A
    destination no longer configured that still holds events is shown too, with what to
    do. A broken destinations file is reported on top, and what Redis holds is shown all
    the same (exit code 3).

    \b
    Example:
      capi status --json | jq .key
    """
    settings = settings_from(ctx)
    file_error = None
    try:
        names: list[str] | None = destination_names(settings, destination)
    except ConfigError as exc:
        file_error = str(exc)
        names = [n.strip() for n in destination.split(",")] if destination else None
    report = run(_report(settings, names))
    report["destinations_file_error"] = file_error
    if as_json:
        print_json(_as_json(report))
    else:
        _print_report(report)
    if file_error:
        sys.exit(ExitCode.CONFIG)


async def _report(settings: Settings, names: list[str] | None) -> dict[str, Any]:
    """Each destination's status (every one Redis holds when ``names`` is None: the file
    cannot be read), the shared part, and the destinations no longer configured."""
    client = redis_client(settings)
    try:
        shared = await shared_status(client, settings.keys)
        replicas = shared["redis"].get("replicas")
        if settings.enqueue_durability == "replica" and replicas is not None:
            shared["redis"]["confirming_replicas"] = confirming(replicas)
        if settings.enqueue_durability == "replica" and "shards" in shared["redis"]:
            confirmed = await cluster_confirming(client)
            for shard in shared["redis"]["shards"]:
                shard["confirming_replicas"] = confirmed.get(shard["node"], 0)
        if names is None:
            names = await destinations_in_redis(client, settings.keys) or ["default"]
            left: dict[str, dict[str, Any]] = {}
        else:
            left = await stranded(client, settings.keys, destinations.names(settings))
        statuses = {
            n: {**await destination_status(client, settings.keys.for_destination(n)), **shared}
            for n in names
        }
    finally:
        await client.aclose()
    for status in [*statuses.values(), *left.values()]:
        status["endpoint"] = endpoint_truth(status["endpoint"], shared["workers"])
    return {"statuses": statuses, "shared": shared, "stranded": left}


def endpoint_truth(endpoint: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The endpoint's recorded state, unless no live worker can know it: then ``unknown``
    (``why`` says so; ``recorded_state`` keeps what was last recorded)."""
    starting = [w for w in workers if w["state"] == "starting"]
    if workers and len(starting) < len(workers):
        return endpoint
    why = "no live worker" if not workers else f"the worker is starting: {starting[0]['detail']}"
    return {**endpoint, "state": "unknown", "recorded_state": endpoint["state"], "why": why}


def _as_json(report: dict[str, Any]) -> dict[str, Any]:
    statuses, shared = report["statuses"], report["shared"]
    extra = {
        "stranded": report["stranded"],
        "destinations_file_error": report["destinations_file_error"],
    }
    if len(statuses) == 1:
        name, status = next(iter(statuses.items()))
        return {"destination": name, **status, **extra}
    return {
        "destinations": statuses,
        "workers": shared["workers"],
        "workers_alive": shared["workers_alive"],
        "redis": shared["redis"],
        **extra,
    }


def _print_report(report: dict[str, Any]) -> None:
    statuses = report["statuses"]
    if report["destinations_file_error"]:
        out.print(
            f"[bold red]destinations file: BROKEN:[/] {escape(report['destinations_file_error'])}"
            "\n  Running workers keep the destinations they had; capi commands that need the "
            "file refuse until it is fixed. What Redis holds:\n"
        )
    several = len(statuses) > 1 or report["destinations_file_error"]
    compact = len(statuses) > COMPACT_OVER
    listed = {n: s for n, s in statuses.items() if needs_attention(s)} if compact else statuses
    if compact:
        _print_overview(statuses, listed)
    for i, (name, status) in enumerate(listed.items()):
        if several:
            out.print(("\n" if i or compact else "") + f"[bold]destination {escape(name)}[/]")
        _print_status(status, workers=not several, redis=not compact)
    if several:  # the workers serve them all: said once, after them (not in the last one's)
        out.print()
        _print_workers(report["shared"]["workers"])
    if compact:  # and Redis's alerts, said in each section shown in full otherwise
        _print_redis(report["shared"]["redis"])
    for name, status in report["stranded"].items():
        _print_stranded(name, status)


# Over this many destinations, the text shows their totals and, in full, only those that
# need attention (``--json`` and ``--destination`` still give every one in full).
COMPACT_OVER = 20
# A destination whose oldest queued event waited longer than this needs attention.
WAITING_LONG_S = 60


def needs_attention(status: dict[str, Any]) -> bool:
    """Whether a destination's section is worth reading: its key is held or being
    confirmed, its endpoint fails, it holds dead letters or retries, or its queue waits."""
    oldest = status["oldest_queued_age_s"]
    return (
        status["key"].get("state") in ("held", "confirming")
        or status["endpoint"]["state"] == "failing"
        or status["dead_letters"] > 0
        or status["retry_batches_scheduled"] > 0
        or (oldest is not None and oldest > WAITING_LONG_S)
        or coverage.weak_warning(status["match_coverage"]) is not None
    )


def _print_overview(statuses: dict[str, dict[str, Any]], listed: dict[str, Any]) -> None:
    """The totals of many destinations, and which are shown in full."""
    total = {
        what: sum(s[what] for s in statuses.values())
        for what in ("queued", "in_flight", "retry_batches_scheduled", "dead_letters")
    }
    delivered = sum(s["counters"].get("delivered", 0) for s in statuses.values())
    ages = [(s["oldest_queued_age_s"], n) for n, s in statuses.items()]
    oldest = max(((age, n) for age, n in ages if age is not None), default=None)
    keys = Counter(s["key"].get("state", "unchecked") for s in statuses.values())
    endpoints = Counter(s["endpoint"]["state"] for s in statuses.values())
    out.print(
        f"{len(statuses)} destinations: {total['queued']:,} queued"
        + (f" (oldest {oldest[0]} s, {oldest[1]})" if oldest else "")
        + f", {total['in_flight']:,} in flight, {total['retry_batches_scheduled']:,} retry "
        f"batches scheduled, {delivered:,} delivered, {total['dead_letters']:,} dead letters now",
        markup=False,
    )
    out.print("keys:          " + _tally(keys), markup=False)
    out.print("endpoints:     " + _tally(endpoints), markup=False)
    others = len(statuses) - len(listed)
    out.print(
        (
            f"{len(listed)} need attention (a key held or being confirmed, a failing "
            f"endpoint, dead letters, retries, events waiting over {WAITING_LONG_S} s, or "
            "weak match coverage), in full below; "
            if listed
            else "none needs attention; "
        )
        + f"{others} others: `capi destinations` lists each, `capi status --destination NAME` "
        "shows one in full",
        markup=False,
    )


def _tally(counts: Counter[str]) -> str:
    return ", ".join(f"{n:,} {state}" for state, n in counts.most_common())


def _print_stranded(name: str, status: dict[str, Any]) -> None:
    what = (
        f"{status['queued']} queued, {status['in_flight']} in flight, "
        f"{status['retry_batches_scheduled']} retry batches scheduled, "
        f"{status['dead_letters']} dead letters"
    )
    out.print(
        f"\n[bold]destination {escape(name)}: NOT CONFIGURED[/] (not in the destinations "
        f"file), and it still holds {what}.\n"
        f"  No worker sends them. To send them, add {escape(f'[destinations.{name}]')} to the "
        "destinations file (a worker picks it up);\n"
        f"  to drop the queued ones: capi queue purge --destination {escape(name)}"
    )


def _print_status(status: dict[str, Any], *, workers: bool = True, redis: bool = True) -> None:
    counters = status["counters"]
    oldest = status["oldest_queued_age_s"]
    out.print(
        f"queued:        {status['queued']}"
        + (f" (oldest {oldest} s)" if oldest is not None else "")
    )
    out.print(f"in flight:     {status['in_flight']}")
    out.print(f"retries:       {status['retry_batches_scheduled']} batches scheduled")
    for name in ("enqueued", "delivered", "retried", "dead_lettered", "transient_key_failures"):
        out.print(f"{name + ':':<14} {counters.get(name, 0)}")
    if counters.get("validated"):
        out.print(
            f"validated:     {counters['validated']} (test mode: checked by the API with "
            "validate_only, never saved nor counted as delivered)"
        )
    if counters.get("accepted_mismatches"):
        out.print(
            f"accepted_events mismatches: {counters['accepted_mismatches']} batches answered 200 "
            "with a count differing from the events sent (see the worker log)"
        )
    reasons = ", ".join(f"{k} {v}" for k, v in status["dead_letters_by_reason"].items())
    out.print(f"dead letters:  {status['dead_letters']} now")
    if reasons:
        out.print(f"  all time, by reason (replayed and purged included): {reasons}")
    out.print("key:           " + shown(_key_line(status["key"])), markup=False)
    if workers:
        _print_workers(status["workers"])
    out.print("endpoint:      " + shown(_endpoint_line(status["endpoint"])), markup=False)
    if redis:
        _print_redis(status["redis"])
    if status["key"].get("state") == "held":
        out.print(shown(status["key"].get("guidance", ""), lines=True), markup=False)
    if warning := coverage.weak_warning(status["match_coverage"]):
        out.print(warning, markup=False)


def _print_workers(workers: list[dict[str, Any]]) -> None:
    out.print(f"workers alive: {len(workers)}")
    for w in workers:
        where = f" [{w['destination']}]" if w.get("destination") else ""
        line = f"  {w['name']}{where}: {w['state']} ({w['detail']})"
        out.print(shown(line), markup=False)


def _key_line(key: dict[str, Any]) -> str:
    state = key.get("state")
    if state == "held":
        return f"held since {key.get('since')} ({key.get('reason')})"
    if state == "confirming":
        return (
            f"confirming since {key.get('confirming_since')} ({key.get('confirming_reason')}): "
            "probes are deciding whether the key is broken and must be held"
        )
    return str(state)


def _endpoint_line(endpoint: dict[str, Any]) -> str:
    last_ok = endpoint["last_ok_at"] or "none yet"
    if endpoint["state"] == "unknown":
        seen = (
            f"last seen failing since {endpoint['failing_since']}"
            if endpoint.get("recorded_state") == "failing"
            else f"last delivery {last_ok}"
        )
        return f"unknown: {endpoint['why']} ({seen})"
    if endpoint["state"] == "failing":
        return f"failing since {endpoint['failing_since']} (last error {endpoint['last_error']})"
    return f"ok (last delivery {last_ok})"


def _print_redis(mem: dict[str, Any]) -> None:
    if mem["role"] == "slave":
        out.print(
            "redis:         READ-ONLY: CAPI_REDIS_URL points at a replica (after a failover?); "
            "producers are refused and workers wait until it is a primary again",
            markup=False,
        )
    if mem.get("confirming_replicas") == 0:
        lags = ", ".join(f"{r['state']}, last ack {r['lag_s']} s ago" for r in mem["replicas"])
        out.print(
            "redis:         NO REPLICA CONFIRMS WRITES "
            f"({lags or 'no replica connected'}): under CAPI_ENQUEUE_DURABILITY=replica "
            "producers get QueueUnavailable and the intake 503 until one does",
            markup=False,
        )
    alone = [s["node"] for s in mem.get("shards", ()) if s.get("confirming_replicas") == 0]
    if alone:
        out.print(
            f"redis:         NO REPLICA CONFIRMS WRITES on {len(alone)} of the "
            f"{len(mem['shards'])} masters ({', '.join(alone)}): under "
            "CAPI_ENQUEUE_DURABILITY=replica the destinations whose keys live there get "
            "QueueUnavailable and the intake 503 until one does",
            markup=False,
        )
    full = [s for s in mem.get("shards", ()) if s.get("full")]
    if full:
        where = ", ".join(
            f"{s['node']}: {s['used_memory']} of {s['maxmemory']} bytes" for s in full
        )
        out.print(
            f"redis:         FULL on {len(full)} of the {len(mem['shards'])} masters ({where}; "
            "maxmemory reached under noeviction): the destinations whose keys live there are "
            "refused (the intake answers 503) until workers drain it or maxmemory is raised",
            markup=False,
        )
    elif mem["full"]:
        out.print(
            f"redis:         FULL: {mem['used_memory']} of maxmemory {mem['maxmemory']} bytes "
            f"under {mem['maxmemory_policy']}; producers are refused until workers drain it "
            "or maxmemory is raised",
            markup=False,
        )


@cli.command("health")
@click.option("--url", help="Check this endpoint instead (e.g. a worker's /readyz).")
@click.pass_context
@handle_errors
def health_command(ctx: click.Context, url: str | None) -> None:
    """Exit 0 when capi is ready, 1 when it is not (for Docker and Kubernetes probes).

    Without --url: Redis answers, the key is not held, and a worker past its startup
    check sent a heartbeat in the last 5 s (Redis that cannot be reached: exit 5).
    With --url: that endpoint answers 200 (what it says is printed: why a worker is not ready).

    \b
    Examples:
      capi health --url http://127.0.0.1:9464/readyz   # a worker run with --metrics-port 9464
      capi health
    """
    if url:
        if not url.startswith(("http://", "https://")):
            fail(f"--url: {url!r} is not a URL; give one like {EXAMPLE_URL}", ExitCode.USAGE)
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (operator's URL)
                ok, why = resp.status == 200, _answer(resp.status, resp.read(_SAID))
        except urllib.error.HTTPError as exc:
            ok, why = False, _answer(exc.code, exc.read(_SAID))
        except urllib.error.URLError as exc:  # no answer: say why, not the exception's repr
            ok, why = False, f"{url} cannot be reached ({exc.reason})"
        except OSError as exc:
            ok, why = False, f"{url} cannot be reached ({exc})"
    else:
        ok, why = _healthy(settings_from(ctx))
    out.print(("ok: " if ok else "not ready: ") + why, markup=False)
    sys.exit(ExitCode.OK if ok else ExitCode.FAILURE)


EXAMPLE_URL = "http://127.0.0.1:9464/readyz"
_SAID = 500  # the bytes of an answer read for what it says


def _answer(status: int, body: bytes) -> str:
    """``HTTP 503: why``: the status and what the answer says (a worker's /readyz: its first
    line; the intake's: the JSON's ``reason``), made safe to print; the status alone when
    it says nothing readable."""
    text = body.decode("utf-8", "replace").strip()
    try:
        said = json.loads(text)
    except ValueError:
        said = None
    if isinstance(said, dict):
        text = str(said.get("reason") or said.get("status") or "")
    line = text.splitlines()[0].strip() if text else ""
    return f"HTTP {status}: {shown(line[:200])}" if line else f"HTTP {status}"


def _healthy(settings: Settings) -> tuple[bool, str]:
    """As /readyz: ready while a started worker lives and some destination can send."""
    statuses = run(_report(settings, destination_names(settings, None)))["statuses"]
    held = [n for n, st in statuses.items() if st["key"].get("state") == "held"]
    workers = next(iter(statuses.values()))["workers"]
    started = [w for w in workers if w["state"] != "starting"]
    ok = bool(started) and len(held) < len(statuses)
    if not started:
        return False, (f"worker starting: {workers[0]['detail']}" if workers else "no live worker")
    if held:
        names = "" if held == ["default"] else " (" + ", ".join(held) + ")"
        return ok, ("key held" if not ok else "ok, but a key is held") + names
    return True, "a worker is live and can send"
