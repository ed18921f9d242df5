"""Enqueue events from a backend service: validated and hashed before they touch Redis.

:class:`Producer` (asyncio: FastAPI, aiohttp) and :class:`SyncProducer` (Django, Flask,
scripts) share one core: :func:`capi.events.prepare` refuses a bad event with
:class:`~capi.errors.EventRejected` naming each field and rule, and one Lua script adds
the event to the stream unless its name and id were enqueued within the dedup window
(:mod:`capi.dedup`). Bulk enqueue
sends up to ``chunk`` events per script call. Nothing in Redis is pickled: the event is the
API's own JSON, and raw identifiers never reach it.

::

    async with Producer.from_settings(Settings.load()) as producer:
        await producer.enqueue(signup("user-42", email="ada@example.com",
                                      source_url="https://example.com/welcome"))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, overload

import redis
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import CollectorRegistry, Counter

from capi import dedup, index, kinds, tail
from capi import destinations as destinations_
from capi.clock import Clock
from capi.constants import RedisKeys
from capi.destinations import DEFAULT_NAME as DEFAULT_DESTINATION
from capi.destinations import Consent
from capi.durability import Durability
from capi.errors import EventRejected, Problem, QueueFull, QueueUnavailable
from capi.events import PreparedEvent, Unreadable, kept_name, kept_text, prepare
from capi.grouping import Coalescer
from capi.queue import (
    ENQUEUE_LUA,
    call_destination,
    call_skipped,
    enqueue_call,
    lua,
    merged_enqueue_calls,
)
from capi.redisconn import (
    CLUSTER_SETTINGS,
    async_node_client,
    brief,
    cluster_of,
    connection_kwargs,
    describe,
    is_cluster,
    settings_hint,
)
from capi.schema import Event
from capi.settings import Settings
from capi.trouble import classify

RawEvent = Mapping[str, Any] | Event
Call = tuple[list[str], list[Any]]  # one enqueue script call: its keys and arguments
# An event for the live-outcomes ring: (the ring's key, or "" for every target's; status,
# refused or skipped; the rule(s); (id, type, kinds, timestamp_ms or 0)).
RingNote = tuple[str, str, str, tuple[str, str, list[str], int]]
# How many of a refused event's broken rules its line in the ring names (then "and N more").
RULES_SHOWN = 3
log = logging.getLogger("capi.producer")
_NO_RULES = Consent()
_INDEX = re.compile(r"\[\d+\]")


class ProducerMetrics:
    """A producer's Prometheus counters, in the registry its owner exports (the intake's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.identifiers_dropped = Counter(
            "capi_identifiers_dropped",
            "Invalid optional identifiers left out of queued events, by destination and field.",
            ["destination", "field"],
            registry=registry,
        )
        self.skipped = Counter(
            "capi_events_skipped",
            "Events not queued because their consent was denied (consent_policy drop).",
            ["destination"],
            registry=registry,
        )

    def dropped(self, destination: str, path: str) -> None:
        """Count one identifier left out (the field without list positions)."""
        self.identifiers_dropped.labels(destination, _INDEX.sub("", path)).inc()


@dataclass
class EnqueueReport:
    """What a bulk enqueue did: how many were queued, duplicates, and each refusal.

    ``added`` holds, by position, the answer for each event Redis took: True queued, False a
    duplicate. ``warnings`` holds, by position, the invalid optional identifiers left out
    of an event that was taken (field and rule); ``skipped`` the events not sent to a
    destination because their consent was denied under its ``drop`` policy, with why. A
    position in none of ``added``, ``refused`` and ``skipped`` did not reach Redis, or its
    call failed before Redis answered (sending it again is safe: the id dedups); ``sent``
    holds the positions whose call was sent, so one of those not in it was never sent (a
    call stops at its first chunk that fails).
    """

    queued: int = 0
    duplicates: int = 0
    refused: list[tuple[int, EventRejected]] = field(default_factory=list)
    added: dict[int, bool] = field(default_factory=dict)
    warnings: dict[int, list[Problem]] = field(default_factory=dict)
    skipped: dict[int, list[Problem]] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)

    def status(self, i: int) -> str | None:
        """The answer for the event at position ``i``: queued, duplicate, skipped or
        refused (None: it did not reach Redis)."""
        if i in self.added:
            return "queued" if self.added[i] else "duplicate"
        if i in self.skipped:
            return "skipped"
        if any(j == i for j, _ in self.refused):
            return "refused"
        return None

    @property
    def ok(self) -> bool:
        """Whether no event was refused."""
        return not self.refused


@contextlib.contextmanager
def _translated(client: Any) -> Iterator[None]:
    """Turn Redis being away, slow or full into QueueUnavailable / QueueFull, with a true
    message: a call that failed after it was sent may have stored its events."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        kind, meaning = classify(exc)
        if kind == "full":
            raise QueueFull(
                f"Redis at {_where(client)} is full (maxmemory reached under noeviction); the "
                "event was not queued. Workers free memory as they deliver; raise maxmemory or add "
                "workers, then enqueue again."
            ) from None
        if kind not in ("redis-error", "unexpected"):
            raise QueueUnavailable(
                f"Redis at {_where(client)} refused the event: {meaning} ({str(exc)[:200]}); it "
                "was not queued. Enqueueing it again is safe.",
                maybe_stored=False,
            ) from None
        raise
    except redis.exceptions.AuthenticationError as exc:
        raise QueueUnavailable(
            f"Redis at {_where(client)} refused the credentials in CAPI_REDIS_URL ({exc}); the "
            "event was not queued.",
            maybe_stored=False,
        ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # A refused connection does not prove that nothing was written: redis-py sends a
        # call again once on a new connection when the first drops, so a Redis that took
        # the call and died before answering is reported by the second attempt's connect.
        if isinstance(exc, redis.exceptions.ConnectionError) and "connecting to" in str(exc):
            outcome = "the event was not queued, unless Redis went away during the call"
        else:
            outcome = "the event may not have been queued"
        raise _unreachable(_where(client), settings_hint(client), exc, outcome) from None


def _unreachable(
    where: str,
    hint: str,
    exc: Exception,
    outcome: str,
    *,
    again: str = "Enqueueing it again is safe (the event id dedups)",
    maybe_stored: bool = True,
) -> QueueUnavailable:
    """The error for a Redis that could not be reached or did not answer in time."""
    return QueueUnavailable(
        f"Redis at {where} could not be reached or did not answer within "
        f"CAPI_REDIS_TIMEOUT_S ({brief(exc)}); {outcome}. {again}. Check {hint}.",
        maybe_stored=maybe_stored,
    )


@contextlib.contextmanager
def _how_far(targets: int, report: EnqueueReport | None = None) -> Iterator[None]:
    """An enqueue that fails part-way says how far it got: what a bulk call had queued
    before, and, for events to several destinations, that a refusal for one of them does
    not mean that none took them (the calls before it may have run)."""
    try:
        yield
    except QueueUnavailable as exc:
        queued = report.queued if report is not None else 0
        fanned = targets > 1 and not exc.maybe_stored
        if not queued and not fanned:
            raise
        said = str(exc)
        if queued:
            said += (
                f" This call had queued {queued} events before it failed; enqueueing them "
                "all again is safe (the event id dedups)."
            )
        if fanned:
            said += (
                f" With {targets} destinations, those whose call came before may have "
                "queued it; enqueueing it again is safe (the event id dedups)."
            )
        raise type(exc)(said, maybe_stored=exc.maybe_stored or fanned) from None


def _where(client: Any) -> str:
    return describe(client)


# Where an event goes: None (the only destination), one name, or several (fan-out).
Destination_ = str | list[str] | tuple[str, ...] | None


def _answer(added: dict[str, bool], destination: Destination_) -> bool | dict[str, bool]:
    if destination is None or isinstance(destination, str):
        return next(iter(added.values()))
    return added


class _BaseProducer:
    """What both producers share: settings, validation, and the enqueue script's arguments."""

    def __init__(
        self,
        client: Any,
        *,
        keys: RedisKeys | None = None,
        dedup_window_s: int = 86_400,
        clock: Clock = time.time,
        chunk: int = 500,
        durability: str = "memory",
        durability_timeout_ms: int = 1000,
        destinations: Sequence[str] | destinations_.Names = (DEFAULT_DESTINATION,),
        tail_entries: int = 200,
        consents: Mapping[str, Consent] | destinations_.Consents | None = None,
        strict_identifiers: bool = False,
        registry: CollectorRegistry | None = None,
        group_events: int = 0,
    ) -> None:
        """``group_events`` above 0 (asyncio :class:`Producer` only) sends the script calls
        of concurrent enqueues together, in one round trip of at most that many events."""
        self.redis = client
        self.tail_entries = tail_entries
        self._names = destinations
        self._consents = consents
        self.strict_identifiers = strict_identifiers
        self.metrics = ProducerMetrics(registry) if registry is not None else None
        self.durability = durability
        self.durability_timeout_ms = durability_timeout_ms
        self._durability = Durability(durability, durability_timeout_ms)
        self.keys = keys or RedisKeys()
        self._keys_by_name: dict[str, RedisKeys] = {}
        self.dedup_window_s = dedup_window_s
        self.clock = clock
        self.chunk = chunk
        self._lua = lua(self.keys, ENQUEUE_LUA)
        self._script = client.register_script(self._lua)
        self.group_events = group_events
        # On a cluster, a write and the wait after it go to the node holding the write's slot,
        # on one connection: a plain client per node (see _pinned).
        self._nodes: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Self:
        """A producer for the Redis, prefix and durability in ``settings`` (logs a warning
        when that is the default Redis because CAPI_REDIS_URL is not set)."""
        if "redis_url" not in settings.model_fields_set and settings.sentinels is None:
            log.warning(
                "capi: CAPI_REDIS_URL is not set; enqueueing to the default Redis at %s",
                settings.redis_url,
            )
        kwargs.setdefault("destinations", destinations_.Names(settings))
        kwargs.setdefault("consents", destinations_.Consents(settings))
        kwargs.setdefault("strict_identifiers", settings.strict_identifiers)
        kwargs.setdefault("durability", settings.enqueue_durability)
        kwargs.setdefault("durability_timeout_ms", settings.durability_timeout_ms)
        kwargs.setdefault("tail_entries", settings.tail_entries)
        return cls(
            cls._connect(settings),
            keys=settings.keys,
            dedup_window_s=settings.dedup_window_s,
            **kwargs,
        )

    @staticmethod
    def _connect(settings: Settings) -> Any:
        raise NotImplementedError

    def _pipeline(self, calls: list[tuple[list[str], list[Any]]]) -> Any:
        """The enqueue script's calls, then the durability wait, as one pipeline: the wait
        covers the last write of its own connection (see :mod:`capi.durability`)."""
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        for command in self._durability.commands():
            pipe.execute_command(*command)
        return pipe

    def _pinned(self, calls: list[tuple[list[str], list[Any]]]) -> dict[str, list[int]]:
        """On a cluster: the calls (by position) grouped by the node that holds their slot."""
        groups: dict[str, list[int]] = {}
        try:
            for i, (keys, _) in enumerate(calls):
                groups.setdefault(self.redis.get_node_from_key(keys[0]).name, []).append(i)
        except redis.exceptions.RedisClusterException as exc:  # a slot no master serves
            raise redis.exceptions.ConnectionError(f"Redis Cluster: {exc}") from exc
        return groups

    def _node_pipeline(self, node_name: str, calls: list[tuple[list[str], list[Any]]]) -> Any:
        """:meth:`_pipeline` on one connection to one node of a cluster."""
        node = self.redis.get_node(node_name=node_name)
        client = self._nodes.get(node_name)
        if client is None:
            client = self._nodes[node_name] = self._node_client(node)
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        for command in self._durability.commands():
            pipe.execute_command(*command)
        return pipe

    @staticmethod
    def _node_client(node: Any) -> Any:
        raise NotImplementedError

    def _unpacked(
        self, calls: list[tuple[list[str], list[Any]]], answers: list[Any]
    ) -> tuple[list[list[int]], list[str]]:
        """The scripts' per-event answers, and (on a cluster) the destinations whose flag a
        script set: those go into the active set next (capi.index). The events each call
        skipped are counted here, for calls whose answers are used: Redis took the call and,
        under ``aof`` or ``replica``, the wait confirmed it (a request answered an error
        counts no skip here, though Redis's stats may have counted it)."""
        out, armed = [], []
        for (_, args), answer in zip(calls, answers, strict=True):
            result, newly, _ = index.unpack(self.keys, answer)
            out.append(result)
            if newly:
                armed.append(call_destination(args))
            skipped = call_skipped(args)
            if skipped and self.metrics is not None:
                self.metrics.skipped.labels(call_destination(args)).inc(skipped)
        return out, armed

    def _confirmed(self, calls: int, answers: list[Any], each: bool = False) -> list[Any] | None:
        """The scripts' answers once the wait confirmed them; None if the script must be
        loaded first (NOSCRIPT: nothing was written). Raises what Redis refused (with
        ``each``, a call's own refusal is left in its place; a slot that moved is raised)."""
        flags = answers[:calls]
        if any(isinstance(f, redis.exceptions.NoScriptError) for f in flags):
            return None
        for flag in flags:
            if isinstance(flag, Exception) and not (each and _refused(flag)):
                raise flag
        self._durability.check(answers[calls:])
        return flags

    def _prepare(self, event: RawEvent) -> PreparedEvent:
        """prepare(), with any failure it did not foresee turned into a refusal of this event:
        a caller's hostile object (a Mapping whose ``items()`` raises, say) must not cost the
        other events of a bulk call, nor surface as anything but EventRejected."""
        try:
            return prepare(event, clock=self.clock, strict_identifiers=self.strict_identifiers)
        except EventRejected:
            raise
        except Exception as exc:
            log.warning("event refused: checking it raised %s", type(exc).__name__)
            why = f"could not be read as an event ({type(exc).__name__})"
            raise EventRejected([Problem("(event)", why)]) from None

    @property
    def destinations(self) -> list[str]:
        """The destinations this producer may enqueue to (the file's, as it is now)."""
        names = self._names
        return names.current() if isinstance(names, destinations_.Names) else list(names)

    def _targets(self, destination: Destination_) -> list[RedisKeys]:
        """The keys of each destination an event goes to; EventRejected if one is unknown."""
        configured = self.destinations
        if destination is None:
            if len(configured) != 1:
                raise EventRejected(
                    [
                        Problem(
                            "destination",
                            "name one: this deployment has several ("
                            + destinations_.listed(configured)
                            + ")",
                        )
                    ]
                )
            names = configured
        else:
            names = [destination] if isinstance(destination, str) else list(destination)
            if not names:
                raise EventRejected([Problem("destination", "name at least one")])
        unknown = [n for n in names if n not in configured]
        if unknown:
            raise EventRejected(
                [
                    Problem(
                        "destination",
                        f"{unknown[0][:40]!r} is not configured; the destinations are: "
                        + destinations_.listed(configured),
                    )
                ]
            )
        return [self._keys_of(n) for n in dict.fromkeys(names)]

    def _keys_of(self, destination: str) -> RedisKeys:
        """The keys of a configured destination (made once per name)."""
        found = self._keys_by_name.get(destination)
        if found is None:
            found = self._keys_by_name[destination] = self.keys.for_destination(destination)
        return found

    def consent(self, destination: str) -> Consent:
        """The consent rules of a destination (drop, granted unless configured)."""
        rules = self._consents
        if rules is None:
            return _NO_RULES
        current = rules.current() if isinstance(rules, destinations_.Consents) else rules
        return current.get(destination, _NO_RULES)

    def _one(
        self, event: RawEvent, targets: list[RedisKeys], ring: list[RingNote]
    ) -> list[tuple[list[str], list[Any], bool]]:
        """The script call for one event to each destination, and whether it is sent
        there; its warnings are logged (one event has no report to carry them); a skip, or
        its refusal (then raised), is noted in ``ring``."""
        report = EnqueueReport()
        try:
            prepared = self._prepare(event)
        except EventRejected as exc:
            ring.append(("", "refused", *_described(event, exc)))
            raise
        self._warn(0, prepared, report, targets)
        for p in report.warnings.get(0, ()):
            log.warning("event %r: %s: left out: %s", prepared.id[:64], p.path, p.rule)
        calls = []
        for target in targets:
            keys, args, positions = self._for_target([prepared], [0], target, report, ring)
            calls.append((keys, args, bool(positions)))
        return calls

    def _chunks(
        self,
        events: Iterable[RawEvent],
        report: EnqueueReport,
        targets: list[RedisKeys],
        refusals: list[RingNote],
    ) -> Iterator[tuple[list[str], list[Any], list[int]]]:
        """Script arguments per chunk of prepared events, with the chunk's positions; each
        refused event is described in ``refusals`` for the live-outcomes ring."""
        prepared = []
        positions = []
        for i, raw in enumerate(events):
            try:
                p = self._prepare(raw)
            except EventRejected as exc:
                # Kept as data (its problems), without the frames it was raised through:
                # they hold this report and every event of the call, a cycle only a full
                # collection breaks (8 bodies of 1,000 refused events held 3 GB).
                exc.__traceback__ = exc.__context__ = None
                report.refused.append((i, exc))
                refusals.append(("", "refused", *_described(raw, exc)))
                continue
            prepared.append(p)
            positions.append(i)
            if p.warnings:
                self._warn(i, p, report, targets)
        for start in range(0, len(prepared), self.chunk):
            end = start + self.chunk
            for target in targets:  # fan-out: one copy per destination, each on its own
                yield self._for_target(
                    prepared[start:end], positions[start:end], target, report, refusals
                )

    def _warn(
        self, i: int, p: PreparedEvent, report: EnqueueReport, targets: list[RedisKeys]
    ) -> None:
        report.warnings[i] = list(p.warnings)
        if self.metrics is not None:
            for t in targets:
                for w in p.warnings:
                    self.metrics.dropped(t.destination, w.path)

    def _for_target(
        self,
        batch: list[PreparedEvent],
        positions: list[int],
        target: RedisKeys,
        report: EnqueueReport,
        ring: list[RingNote] | None = None,
    ) -> tuple[list[str], list[Any], list[int]]:
        """The script call for one destination: each event as its consent rules make it
        (sent, sent opted out, or skipped: counted, never stored), with the positions sent;
        skipped events are noted in ``ring`` (id and name only: no identifier kinds)."""
        rules = self.consent(target.destination)
        if rules == _NO_RULES and not any(p.consent for p in batch):
            return (*self._args(batch, target), positions)  # the usual case: all sent
        sent, where, skipped = [], [], 0
        for p, i in zip(batch, positions, strict=True):
            fate = rules.fate(p.consent)
            if fate == "drop":
                skipped += 1
                why = f"consent denied: not sent to {target.destination} (consent_policy drop)"
                report.skipped.setdefault(i, []).append(Problem("consent", why))
                if ring is not None:
                    note: tuple[str, str, list[str], int] = (
                        p.id[:128],
                        p.name[:64],
                        [],
                        p.timestamp_ms,
                    )
                    ring.append(
                        (target.tail, "skipped", "consent: denied (consent_policy drop)", note)
                    )
                continue
            sent.append(p if fate == "send" else p.opted_out())
            where.append(i)
        return (*self._args(sent, target, skipped), where)

    def _args(
        self, batch: list[PreparedEvent], target: RedisKeys, skipped: int = 0
    ) -> tuple[list[str], list[Any]]:
        return enqueue_call(
            target,
            self.dedup_window_s,
            (
                (dedup.digest(f"{p.name}:{p.id}"), p.id, p.timestamp_ms, p.json, p.mask)
                for p in batch
            ),
            skipped,
        )

    def _ring(self, targets: list[RedisKeys], notes: list[RingNote]) -> list[tail.Write]:
        """The XADDs that put refused and skipped events in the live-outcomes rings (a
        refused event in every target's)."""
        grouped: dict[tuple[str, str, str], list[tuple[str, str, list[str], int]]] = {}
        for key, status, rule, event in notes:
            for ring in [key] if key else [t.tail for t in targets]:
                grouped.setdefault((ring, status, rule), []).append(event)
        return [
            command
            for (ring, status, rule), events in grouped.items()
            for command in tail.writes(
                ring, tail.Outcome(status, events, reason=rule), self.tail_entries
            )
        ]

    @staticmethod
    def _count(report: EnqueueReport, flags: list[int], positions: list[int]) -> None:
        queued = sum(int(f) for f in flags)
        report.queued += queued
        report.duplicates += len(flags) - queued
        added = report.added
        for i, flag in zip(positions, flags, strict=True):
            added[i] = added.get(i, False) or bool(flag)  # fan-out: queued to any counts


def _ring_missed(count: int, exc: Exception) -> None:
    """The live view's ring (``capi tail``) was not written: the events are queued all the
    same (the ring is a view), and the log says what the view misses."""
    log.warning("capi tail misses %d outcome(s) of this enqueue: %s", count, brief(exc))


class Producer(_BaseProducer):
    """Validates, hashes and enqueues events (asyncio)."""

    @staticmethod
    def _connect(settings: Settings) -> aioredis.Redis:
        return settings.async_redis()

    @functools.cached_property
    def _group(self) -> Coalescer[list[Call], list[list[int]]] | None:
        """With ``group_events`` on one Redis, the queue that sends concurrent enqueues'
        script calls together (see :mod:`capi.grouping`); a cluster has one per node
        (:meth:`_node_group`)."""
        if self.group_events <= 0 or is_cluster(self.redis):
            return None
        return Coalescer(self._send_group, self.group_events)

    def _node_group(self, node: str) -> Coalescer[list[Call], list[list[int]]]:
        """On a cluster, the queue of the calls to one master: each round trip (and its
        wait) goes to one node, so a node that fails costs only the calls sent to it."""
        found = self._node_groups.get(node)
        if found is None:
            found = self._node_groups[node] = Coalescer(self._send_node_group, self.group_events)
        return found

    @functools.cached_property
    def _node_groups(self) -> dict[str, Coalescer[list[Call], list[list[int]]]]:
        return {}

    @property
    def waiting(self) -> int:
        """Events given to :meth:`enqueue` / :meth:`enqueue_many` whose round trip has not
        been answered yet (0 unless grouped)."""
        if self._group is not None:
            return self._group.pending
        return sum(group.pending for group in self._node_groups.values())

    async def _run(self, calls: list[Call], events: int = 1) -> list[list[int]]:
        """Run enqueue script calls (of ``events`` events): grouped with other enqueues'
        (``group_events``), or now."""
        if self._group is not None:
            return await self._group.submit(calls, events)
        if self.group_events <= 0:
            return await self._run_now(calls)
        by_node: dict[str, list[int]] = {}  # a cluster: each node's calls go in its group
        for i, (keys, _) in enumerate(calls):
            try:
                node = self.redis.get_node_from_key(keys[0]).name
            except redis.exceptions.RedisClusterException:
                node = ""  # no master known for the slot (none serves it now, or the
                # topology is not read yet): sent as is, ungrouped
            by_node.setdefault(node, []).append(i)
        parts = list(by_node.items())
        runs = [
            self._node_group(node).submit([calls[i] for i in where], events)
            if node
            else self._run_now([calls[i] for i in where])
            for node, where in parts
        ]
        answers = [await runs[0]] if len(runs) == 1 else await asyncio.gather(*runs)
        flags: list[list[int]] = [[] for _ in calls]
        for (_, where), got in zip(parts, answers, strict=True):
            for i, answer in zip(where, got, strict=True):
                flags[i] = answer
        return flags

    async def _send_node_group(self, items: list[list[Call]]) -> list[list[list[int]] | Exception]:
        """On a cluster, the script calls of several enqueues to one node: those to the same
        destination merged, then run (:meth:`_run_each`: in one pipeline with the wait under
        ``aof`` or ``replica``, one call after another under ``memory``; then the index);
        each enqueue's answers, or its own error. The node away, or its wait failed, fails
        the whole group (the node's); Redis refusing one destination's call fails only the
        enqueues of that call."""
        calls, spans = merged_enqueue_calls([call for item in items for call in item])
        got = await self._run_each(calls)
        return [
            next((a for a in mine if isinstance(a, Exception)), mine)
            for _, mine in _per_enqueue(items, got, spans)
        ]

    async def _run_each(self, calls: list[Call]) -> list[Any]:
        """:meth:`_run_now` on a cluster, each call answered with its flags or with the
        error Redis refused it with (a stream key of another type, say)."""
        if not self._durability.waits:
            answers = [await _answer_or_refusal(self._script(keys=k, args=a)) for k, a in calls]
        else:
            answers = await self._run_pinned(calls, each=True)
        done = [i for i, answer in enumerate(answers) if not isinstance(answer, Exception)]
        flags, armed = self._unpacked([calls[i] for i in done], [answers[i] for i in done])
        await index.arm(self.redis, self.keys, armed)
        for i, found in zip(done, flags, strict=True):
            answers[i] = found
        return answers

    async def _run_now(self, calls: list[Call]) -> list[list[int]]:
        """Run enqueue script calls; under ``aof`` or ``replica`` with the wait after them;
        on a cluster, then put newly active destinations in the active set."""
        if not self._durability.waits:
            answers = [await self._script(keys=keys, args=args) for keys, args in calls]
        elif is_cluster(self.redis):
            answers = await self._run_pinned(calls)
        else:
            answers = await self._run_waited(functools.partial(self._pipeline, calls), calls)
        flags, armed = self._unpacked(calls, answers)
        await index.arm(self.redis, self.keys, armed)
        return flags

    async def _run_waited(
        self,
        pipeline: Callable[[], Any],
        calls: list[tuple[list[str], list[Any]]],
        each: bool = False,
    ) -> list[Any]:
        """The calls and the wait, in the pipeline ``pipeline()`` builds (the script loaded
        where it is missing); with ``each``, a call Redis refused answered by its error."""
        for _ in range(2):
            pipe = pipeline()
            answers = await pipe.execute(raise_on_error=False)
            flags = self._confirmed(len(calls), answers, each)
            if flags is not None:
                return flags
            pipe.script_load(self._lua)
            await pipe.execute()
        raise QueueUnavailable("Redis forgot the enqueue script twice; enqueue again")

    async def _send_group(self, items: list[list[Call]]) -> list[list[list[int]] | Exception]:
        """One round trip for the script calls of several enqueues (then the durability wait,
        which covers them all); each enqueue's answers, or its own error. Calls Redis did not
        run for want of the script (NOSCRIPT: nothing written) are sent again once loaded."""
        calls, spans = merged_enqueue_calls([call for item in items for call in item])
        got_merged: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        waited: Exception | None = None
        for _ in range(2):
            got = await self._pipeline([calls[i] for i in todo]).execute(raise_on_error=False)
            if self._durability.waits:
                try:
                    self._durability.check(got[len(todo) :])
                except Exception as exc:  # the wait covers every call of the round trip
                    waited = exc
            for i, answer in zip(todo, got, strict=False):
                got_merged[i] = answer
            todo = [i for i in todo if isinstance(got_merged[i], redis.exceptions.NoScriptError)]
            if not todo:
                break
            await self.redis.script_load(self._lua)
        out: list[list[list[int]] | Exception] = []
        armed: list[str] = []
        for item, mine in _per_enqueue(items, got_merged, spans):
            failed = next((a for a in mine if isinstance(a, Exception)), waited)
            if failed is not None:
                out.append(failed)
                continue
            flags, newly = self._unpacked(item, mine)
            out.append(flags)
            armed += newly
        await index.arm(self.redis, self.keys, armed)
        return out

    async def _run_pinned(
        self, calls: list[tuple[list[str], list[Any]]], each: bool = False
    ) -> list[Any]:
        """On a cluster, under ``aof`` or ``replica``: each node's calls and the wait in one
        pipeline on one connection to that node (the wait covers that connection's writes
        only). A slot that moved (a failover) has the topology read again and every call
        sent again (they dedup); a node that does not answer has it read again for the
        next call. With ``each``, a call Redis refused is answered by its error."""
        await self.redis.initialize()
        answers: list[Any] = [None] * len(calls)
        for _ in range(3):
            try:
                for node, positions in self._pinned(calls).items():
                    part = [calls[i] for i in positions]
                    found = await self._run_waited(
                        functools.partial(self._node_pipeline, node, part), part, each
                    )
                    for i, answer in zip(positions, found, strict=True):
                        answers[i] = answer
                return answers
            except redis.exceptions.ResponseError as exc:
                if not _moved(exc):
                    raise
                await self.redis.nodes_manager.initialize()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                with contextlib.suppress(Exception):
                    await self.redis.nodes_manager.initialize()
                raise
        raise QueueUnavailable("the cluster's slots kept moving (a failover?); enqueue again")

    @staticmethod
    def _node_client(node: Any) -> aioredis.Redis:
        return async_node_client(node)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis connection pool."""
        for client in self._nodes.values():
            await client.aclose()
        await self.redis.aclose()

    @overload
    async def enqueue(self, event: RawEvent, destination: str | None = None) -> bool: ...
    @overload
    async def enqueue(
        self, event: RawEvent, destination: list[str] | tuple[str, ...]
    ) -> dict[str, bool]: ...
    async def enqueue(
        self, event: RawEvent, destination: Destination_ = None
    ) -> bool | dict[str, bool]:
        """Enqueue one event; False if its id was already enqueued within the dedup window,
        or its consent is denied and the destination's policy is ``drop`` (not stored).

        ``destination`` names where it goes (``None``: the only one); a list fans it out,
        one copy per destination, and the answer is then per destination. Raises
        :class:`~capi.errors.EventRejected` if the event breaks a rule or names an unknown
        destination. Invalid optional identifiers are left out and logged as warnings
        (:meth:`enqueue_many` reports them per event).
        """
        targets = self._targets(destination)
        ring: list[RingNote] = []
        try:
            calls = self._one(event, targets, ring)
        except EventRejected:
            await self._write_ring(targets, ring)
            raise
        with _how_far(len(targets)), _translated(self.redis):
            flags = await self._run([(keys, args) for keys, args, _ in calls])
        if ring:
            await self._write_ring(targets, ring)
        added = {
            t.destination: sent and bool(f[0])  # not sent: skipped for consent
            for t, f, (_, _, sent) in zip(targets, flags, calls, strict=True)
        }
        return _answer(added, destination)

    async def enqueue_many(
        self,
        events: Iterable[RawEvent],
        destination: Destination_ = None,
        *,
        report: EnqueueReport | None = None,
    ) -> EnqueueReport:
        """Enqueue many events (to each destination named); refused ones are reported (by
        position), the rest queued. Pass ``report`` to keep what was done when Redis fails
        part-way (the call then raises QueueUnavailable)."""
        report = EnqueueReport() if report is None else report
        targets = self._targets(destination)
        refusals: list[RingNote] = []
        with _how_far(len(targets), report), _translated(self.redis):
            for keys, args, positions in self._chunks(events, report, targets, refusals):
                report.sent.update(positions)
                flags = (await self._run([(keys, args)], len(positions)))[0]
                self._count(report, flags, positions)
        if refusals:
            await self._write_ring(targets, refusals)
        return report

    async def _write_ring(self, targets: list[RedisKeys], notes: list[RingNote]) -> None:
        """Put refused and skipped events in the live-outcomes rings (``capi tail``); a
        failure is logged, never raised: the ring is a view."""
        try:
            await tail.append(self.redis, self._ring(targets, notes), self.tail_entries)
        except redis.exceptions.RedisError as exc:
            _ring_missed(len(notes), exc)


class SyncProducer(_BaseProducer):
    """Validates, hashes and enqueues events (blocking; for Django, Flask and scripts)."""

    @staticmethod
    def _connect(settings: Settings) -> redis.Redis:
        """The settings' client. A cluster client reads the topology as it is made (the
        others connect at their first call): no node answering raises what an enqueue
        would, QueueUnavailable."""
        try:
            return settings.sync_redis()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            url = connection_kwargs(settings.redis_url, settings.redis_timeout_s)
            nodes = [f"{url.get('host')}:{url.get('port', 6379)}"]
            nodes += [f"{host}:{port}" for host, port in settings.cluster_nodes]
            raise _unreachable(
                cluster_of(nodes),
                CLUSTER_SETTINGS,
                exc,
                "the producer could not be made, nothing was queued",
                again="Make it again once a node of the cluster answers",
                maybe_stored=False,
            ) from None

    def _run(self, calls: list[tuple[list[str], list[Any]]]) -> list[list[int]]:
        """Run enqueue script calls; under ``aof`` or ``replica`` with the wait after them;
        on a cluster, then put newly active destinations in the active set."""
        if not self._durability.waits:
            answers = [self._script(keys=keys, args=args) for keys, args in calls]
        elif is_cluster(self.redis):
            answers = self._run_pinned(calls)
        else:
            answers = self._run_waited(functools.partial(self._pipeline, calls), calls)
        flags, armed = self._unpacked(calls, answers)
        index.arm_sync(self.redis, self.keys, armed)
        return flags

    def _run_waited(
        self, pipeline: Callable[[], Any], calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """:meth:`Producer._run_waited`, blocking."""
        for _ in range(2):
            pipe = pipeline()
            answers = pipe.execute(raise_on_error=False)
            flags = self._confirmed(len(calls), answers)
            if flags is not None:
                return flags
            pipe.script_load(self._lua)
            pipe.execute()
        raise QueueUnavailable("Redis forgot the enqueue script twice; enqueue again")

    def _run_pinned(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """:meth:`Producer._run_pinned`, blocking."""
        answers: list[Any] = [None] * len(calls)
        for _ in range(3):
            try:
                for node, positions in self._pinned(calls).items():
                    part = [calls[i] for i in positions]
                    found = self._run_waited(
                        functools.partial(self._node_pipeline, node, part), part
                    )
                    for i, answer in zip(positions, found, strict=True):
                        answers[i] = answer
                return answers
            except redis.exceptions.ResponseError as exc:
                if not _moved(exc):
                    raise
                self.redis.nodes_manager.initialize()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                with contextlib.suppress(Exception):
                    self.redis.nodes_manager.initialize()
                raise
        raise QueueUnavailable("the cluster's slots kept moving (a failover?); enqueue again")

    @staticmethod
    def _node_client(node: Any) -> redis.Redis:
        client: redis.Redis = node.redis_connection  # the cluster's own client for the node
        return client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connection pool."""
        self.redis.close()

    @overload
    def enqueue(self, event: RawEvent, destination: str | None = None) -> bool: ...
    @overload
    def enqueue(
        self, event: RawEvent, destination: list[str] | tuple[str, ...]
    ) -> dict[str, bool]: ...
    def enqueue(self, event: RawEvent, destination: Destination_ = None) -> bool | dict[str, bool]:
        """Enqueue one event; False if its id was already enqueued within the dedup window or
        it was skipped for consent (see :meth:`Producer.enqueue`)."""
        targets = self._targets(destination)
        ring: list[RingNote] = []
        try:
            calls = self._one(event, targets, ring)
        except EventRejected:
            self._write_ring(targets, ring)
            raise
        with _how_far(len(targets)), _translated(self.redis):
            flags = self._run([(keys, args) for keys, args, _ in calls])
        if ring:
            self._write_ring(targets, ring)
        added = {
            t.destination: sent and bool(f[0])  # not sent: skipped for consent
            for t, f, (_, _, sent) in zip(targets, flags, calls, strict=True)
        }
        return _answer(added, destination)

    def enqueue_many(
        self,
        events: Iterable[RawEvent],
        destination: Destination_ = None,
        *,
        report: EnqueueReport | None = None,
    ) -> EnqueueReport:
        """Enqueue many events (to each destination named); refused ones are reported (by
        position), the rest queued (see :meth:`Producer.enqueue_many` for ``report``)."""
        report = EnqueueReport() if report is None else report
        targets = self._targets(destination)
        refusals: list[RingNote] = []
        with _how_far(len(targets), report), _translated(self.redis):
            for keys, args, positions in self._chunks(events, report, targets, refusals):
                report.sent.update(positions)
                self._count(report, self._run([(keys, args)])[0], positions)
        if refusals:
            self._write_ring(targets, refusals)
        return report

    def _write_ring(self, targets: list[RedisKeys], notes: list[RingNote]) -> None:
        """The blocking twin of :meth:`Producer._write_ring`."""
        try:
            tail.append_sync(self.redis, self._ring(targets, notes), self.tail_entries)
        except redis.exceptions.RedisError as exc:
            _ring_missed(len(notes), exc)


def _moved(exc: BaseException) -> bool:
    """Whether Redis answered that a slot is served elsewhere now (MOVED, ASK)."""
    return isinstance(exc, redis.exceptions.AskError) or str(exc).startswith(("MOVED", "ASK"))


def _per_enqueue(
    items: list[list[Call]], got: list[Any], spans: list[tuple[int, int, int]]
) -> Iterator[tuple[list[Call], list[Any]]]:
    """Each enqueue's calls and their answers, out of the answers of the merged calls
    (:func:`capi.queue.merged_enqueue_calls`): its slice of a merged call's flags, or that
    call's error."""
    answers = [
        answer if isinstance(answer := got[m], Exception) else answer[start:end]
        for m, start, end in spans
    ]
    start = 0
    for item in items:
        yield item, answers[start : start + len(item)]
        start += len(item)


def _refused(exc: BaseException) -> bool:
    """Whether Redis refused one call (an error answer, not a slot that moved): the other
    calls of its round trip stand."""
    return isinstance(exc, redis.exceptions.ResponseError) and not _moved(exc)


async def _answer_or_refusal(call: Awaitable[Any]) -> Any:
    """A script call's answer, or the error Redis refused it with (see :func:`_refused`)."""
    try:
        return await call
    except redis.exceptions.ResponseError as exc:
        if not _refused(exc):
            raise
        return exc


def _described(raw: RawEvent, exc: EventRejected) -> tuple[str, tuple[str, str, list[str], int]]:
    """A refused event as the ring shows it: its broken rules (the first ``RULES_SHOWN``,
    then how many more), id, type and identifier kinds (names only; ids cut short and made
    valid UTF-8, since they come from outside; a type or custom event name only when a
    valid event could carry it; a timestamp only when it is a plausible one; an unreadable
    line's rule as it may be kept, without the input it quotes)."""
    data: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    if isinstance(raw, Event):
        data = raw.model_dump(exclude_none=True)
    problems = exc.problems
    if isinstance(raw, Unreadable) and raw.kept is not None:
        problems = [Problem(raw.path, raw.kept)]
    rules = "; ".join(_text(kept_text(p), 200) for p in problems[:RULES_SHOWN])
    if len(problems) > RULES_SHOWN:
        rules += f"; and {len(problems) - RULES_SHOWN} more"
    try:
        event_id = _text(_str(data.get("id")), 128)
        custom = data.get("custom_event_name")
        kind = kept_name(custom if isinstance(custom, str) and custom else _str(data.get("type")))
        found = kinds.of(data)
        stamp = data.get("timestamp_ms")
    except Exception:  # a hostile Mapping: the refusal itself already says why
        event_id, kind, found, stamp = "?", "?", [], 0
    when = stamp if isinstance(stamp, int) and 0 <= stamp < 2**53 else 0
    return rules or "refused", (event_id, kind, found, when)


def _str(value: Any) -> str:
    """A string field as given; anything else (a huge list, say) is never turned into text."""
    return value if isinstance(value, str) and value else "?"


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, lone surrogates and all made valid UTF-8."""
    return value[:limit].encode("utf-8", "replace").decode("utf-8")
