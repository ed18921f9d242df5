"""What an operator may do from the console, each through the module that owns the state
it changes: a dry run (:func:`capi.replay.dry_run`, nothing written), a replay with
progress (:func:`capi.replay.replay`), a purge (:func:`capi.replay.purge`), a key check
(:func:`capi.keycheck.check_key`'s probes; the key state written by
:mod:`capi.worker.keyguard`, its owner). Replays and purges
and key checks are written to the audit with the token's fingerprint.

A replay must follow a dry run: the dry run's verdicts are kept here (for
:data:`DRY_RUN_TTL_S`), and the replay puts back only the events it found acceptable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from capi import clock, replay
from capi.client import ConversionsClient
from capi.constants import RedisKeys
from capi.deadletters import DeadLetter
from capi.destinations import Destination
from capi.keycheck import KeyCheck, check_key
from capi.replay import DryRunResult, Selection
from capi.settings import Settings
from capi.worker import keyguard

DRY_RUN_TTL_S = 900
SHOWN_VERDICTS = 500  # a dry run page lists this many verdicts; the counts cover all
KEPT_JOBS = 100  # finished replays whose progress page stays readable (the newest)


@dataclass
class DryRun:
    """A dry run's verdicts, kept so that the replay that follows sends only these."""

    id: str
    destination: str
    selection: Selection
    results: list[DryRunResult]
    accepted_keys: list[str]
    at: float = field(default_factory=time.monotonic)

    @property
    def accepted(self) -> int:
        """How many events the API would accept."""
        return len(self.accepted_keys)

    @property
    def unchecked(self) -> int:
        """How many events the API said nothing about (a 5xx, a 429, a lost answer, a key
        failure): neither accepted nor rejected."""
        return sum(1 for r in self.results if not r.checked)

    @property
    def rejected(self) -> int:
        """How many events the API would reject (or cannot take: past their deadline)."""
        return len(self.results) - self.accepted - self.unchecked


@dataclass
class Job:
    """A replay under way (or done): how far it got, and what it did."""

    id: str
    destination: str
    total: int
    by: str
    done: int = 0
    state: str = "running"  # running | completed | failed
    report: replay.ReplayReport | None = None
    error: str = ""

    def json(self) -> dict[str, Any]:
        """The job as the progress endpoint shows it."""
        report = self.report
        return {
            "id": self.id,
            "destination": self.destination,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "replayed": report.replayed if report else None,
            "already_gone": report.already_gone if report else None,
            "expired": len(report.expired) if report else None,
            "error": self.error,
        }


def selection_of(keys: list[str], reason: str, until_ms: int | None = None) -> Selection:
    """The records an operator chose: some keys (or ids), or every one with a reason;
    with ``until_ms``, only those dead-lettered by then."""
    reasons = [] if keys or not reason else [reason]
    return Selection(ids=keys, reasons=reasons, until_ms=until_ms)


class Actions:
    """The console's state changes, and the dry runs and replay jobs under way."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.dry_runs: dict[str, DryRun] = {}
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def select(self, name: str, selection: Selection) -> list[DeadLetter]:
        """The selected dead letters of a destination, newest first."""
        keys = self.settings.keys.for_destination(name)
        return await replay.select(self.redis, keys, selection, clock.now_ms())

    async def dry_run(self, dest: Destination, selection: Selection) -> DryRun:
        """Ask the API (validate_only) about each selected event; nothing is queued."""
        records = await self.select(dest.name, selection)
        now = clock.now_ms()
        send = [r for r in records if replay.can_replay(r, now)]
        late = [
            DryRunResult(r.id, False, "past_replay_deadline", "not sent: the API refuses it")
            for r in records
            if r not in send
        ]
        results: list[DryRunResult] = []
        if send:
            timeout_s = min(self.settings.request_timeout_s, 15.0)
            async with ConversionsClient.for_destination(dest, timeout_s=timeout_s) as client:
                results = await replay.dry_run(client, send)
        accepted = [r.key for r, v in zip(send, results, strict=True) if v.accepted]
        self._forget_old()
        run = DryRun(secrets.token_urlsafe(12), dest.name, selection, results + late, accepted)
        self.dry_runs[run.id] = run
        return run

    def _forget_old(self) -> None:
        """Forget expired dry runs, and finished replays beyond the newest
        :data:`KEPT_JOBS` (a running one is always kept)."""
        old = time.monotonic() - DRY_RUN_TTL_S
        for key in [k for k, v in self.dry_runs.items() if v.at < old]:
            del self.dry_runs[key]
        finished = [k for k, v in self.jobs.items() if v.state != "running"]  # oldest first
        for key in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self.jobs[key]

    def start_replay(self, run: DryRun, by: str) -> Job:
        """Replay the events a dry run found acceptable, in the background; the job
        reports progress. The dry run is used up."""
        self.dry_runs.pop(run.id, None)
        self._forget_old()
        job = Job(secrets.token_urlsafe(12), run.destination, run.accepted, by)
        self.jobs[job.id] = job
        task = asyncio.create_task(self._replay(job, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _replay(self, job: Job, run: DryRun) -> None:
        keys = self.settings.keys.for_destination(run.destination)

        def advance(n: int) -> None:
            job.done += n

        try:
            records = await self.select(run.destination, Selection(ids=run.accepted_keys))
            job.report = await replay.replay(
                self.redis,
                keys,
                records,
                selection=run.selection,
                progress=advance,
                actor=job.by,
            )
            job.state = "completed"
        except Exception as exc:  # whatever stopped it, the job's page must say so
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"[:300]

    async def purge(
        self, name: str, records: list[DeadLetter], selection: Selection, by: str
    ) -> int:
        """Delete these dead letters (``selection`` chose them) for good; written to the
        audit."""
        keys = self.settings.keys.for_destination(name)
        return await replay.purge(self.redis, keys, records, actor=by, selection=selection)

    async def check_key(self, dest: Destination, by: str) -> dict[str, Any]:
        """Check a destination's key now (validate_only probes). A key that passes is
        recorded as ok (unless the workers held the destination while it probed: their hold
        stands); a hold is released only when it was confirmed for this key, pixel
        and endpoint (a hold of workers that use another key, a rotation half done, is
        theirs: kept, as ``capi check-key`` keeps it); a failing key is shown, not
        recorded. Either way the check is written to the audit, with who asked."""
        timeout_s = min(self.settings.request_timeout_s, 15.0)
        keys = self.settings.keys.for_destination(dest.name)
        hold = await keyguard.read_hold(self.redis, keys)  # before the probes, as the CLI
        async with ConversionsClient.for_destination(dest, timeout_s=timeout_s) as client:
            result = await check_key(
                client, confirmations=self.settings.probe_confirmations, api_key=dest.api_key
            )
            url = client.url
        held = await self._settle(keys, hold, result, url)
        reason = result.error.reason.value if result.error else ""
        if held == "kept":
            reason = f"another key, pixel or endpoint than the hold's ({hold_reason(hold)}): kept"
        elif held == "released":
            reason = f"hold ({hold_reason(hold)}) released"
        await replay.audit_key_check(self.redis, keys, ok=result.ok, reason=reason, by=by)
        return {
            "ok": result.ok,
            "fingerprint": result.key_fingerprint,
            "reason": result.error.reason.value if result.error else "",
            "diagnosis": result.diagnosis.text if result.diagnosis else "",
            "request_ids": result.request_ids,
            "hold": held,
            "hold_reason": hold_reason(hold),
            "hold_fingerprint": hold.fingerprint if hold else "",
        }

    async def _settle(
        self, keys: RedisKeys, hold: keyguard.Hold | None, result: KeyCheck, url: str
    ) -> str:
        """What became of the hold read before a check: ``none`` (there was none),
        ``held`` (the check failed), ``kept`` (confirmed for another key, pixel or
        endpoint), ``released``, or ``again`` (held anew while or after the check probed)."""
        if hold is None:
            if not result.ok or await keyguard.record_ok(self.redis, keys, result.key_fingerprint):
                return "none"
            return "again"  # the workers held it while the check probed: theirs
        if not result.ok:
            return "held"
        if not hold.same_setup(result.key_fingerprint, result.pixel_id, url):
            return "kept"
        if await keyguard.release(self.redis, keys, hold):
            return "released"
        return "again" if await keyguard.read_hold(self.redis, keys) else "none"


def hold_reason(hold: keyguard.Hold | None) -> str:
    """The reason a hold was confirmed for ("" when there is none)."""
    return hold.reason if hold else ""
