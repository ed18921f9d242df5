"""The key guard: tell a platform hiccup from a broken key, and hold sending while broken.

When a send fails with a key problem (missing scope, RBAC denial, unauthorized, unknown
pixel), the guard re-probes the key with ``validate_only`` (at most once per
``min_probe_interval_s`` per process, and ``confirmations`` probes in a row before calling
it broken). If a probe passes, the failure was transient and the events are retried. If
not, the key is *held*: the state is written to Redis (``{p}:key``) so every worker stops
taking new events, and one worker at a time (a Redis lock) re-probes every
``reprobe_interval_s`` until the key works again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from capi._aio import aw
from capi.client import ConversionsClient
from capi.clock import ms, now_ms
from capi.constants import RedisKeys
from capi.deadletters import iso
from capi.errors import SendError
from capi.failures import Reason
from capi.guidance import diagnose
from capi.keycheck import KeyCheck, check_key
from capi.worker.decisions import FATES, Action, Verdict

log = logging.getLogger("capi.keyguard")

# allow-oom: the key state is tiny, and a worker must record it on a full Redis too.
STATE_LUA = """#!lua flags=allow-oom
-- KEYS: key state hash, stats. ARGV: replace the hash (or update it)?, count a transient
-- failure?, then field, value pairs.
if ARGV[1] == '1' then redis.call('DEL', KEYS[1]) end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[2], 'transient_key_failures', 1) end
return 1
"""

# Written beside the key state while probes confirm a key problem (see KeyGuard._suspect).
CONFIRMING_FIELDS = ("confirming_since", "confirming_reason")

# The re-probe lock: one worker at a time re-probes a held key. allow-oom: a key incident
# is exactly when the queue grows until Redis is full, and the re-probe is the way out.
LOCK_LUA = """#!lua flags=allow-oom
-- KEYS: lock. ARGV: ttl ms. 1 if this caller got the lock.
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 0
"""


RELEASE_LUA = """#!lua flags=allow-oom
-- KEYS: key state hash. ARGV: the hold's since (as read before the key check), then field,
-- value pairs of the ok state. Writes them only over that very hold, not a newer one; 1 if
-- it did.
local found = redis.call('HMGET', KEYS[1], 'state', 'since')
if found[1] ~= 'held' or found[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


RECORD_OK_LUA = """#!lua flags=allow-oom
-- KEYS: key state hash. ARGV: field, value pairs of the ok state. Writes them unless the
-- destination is held (a hold confirmed while the check probed stands); 1 if it did.
if redis.call('HGET', KEYS[1], 'state') == 'held' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass(frozen=True, slots=True)
class Hold:
    """A destination's hold as read from Redis: since when, why, and the key (fingerprint),
    pixel and endpoint of the workers that confirmed it."""

    since: str
    reason: str
    fingerprint: str
    pixel_id: str  # "" in a hold written before capi kept them
    url: str

    def same_setup(self, fingerprint: str, pixel_id: str, url: str) -> bool:
        """Whether a key check of this key, pixel and endpoint speaks for the workers."""
        return (
            self.fingerprint == fingerprint
            and self.pixel_id in ("", pixel_id)
            and (self.url in ("", url))
        )

    @property
    def dead_lettered(self) -> bool:
        """Whether the batches that met this problem were dead-lettered (a key problem),
        rather than handed back to the queue (a setting: the pixel, the endpoint)."""
        try:
            return FATES[Reason(self.reason)].action is Action.REPROBE
        except (ValueError, KeyError):
            return False


async def read_hold(redis: aioredis.Redis, keys: RedisKeys) -> Hold | None:
    """The destination's hold, if it is held."""
    raw = await aw(redis.hgetall(keys.key_state))
    fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    if fields.get("state") != "held":
        return None
    return Hold(
        since=fields.get("since", ""),
        reason=fields.get("reason", ""),
        fingerprint=fields.get("fingerprint", ""),
        pixel_id=fields.get("pixel_id", ""),
        url=fields.get("url", ""),
    )


async def release(redis: aioredis.Redis, keys: RedisKeys, hold: Hold) -> bool:
    """Release ``hold`` after a key check outside the workers (``capi check-key``) passed
    with its key, pixel and endpoint (:meth:`Hold.same_setup`): the workers resume on their
    next read of the state rather than at the next re-probe. Only if it is still the hold in
    Redis: one confirmed after the check's probe stays. True if released."""
    args = [hold.since, *(x for kv in _ok_state(hold.fingerprint).items() for x in kv)]
    return bool(await redis.register_script(RELEASE_LUA)(keys=[keys.key_state], args=args))


async def record_ok(redis: aioredis.Redis, keys: RedisKeys, fingerprint: str) -> bool:
    """Record a key that passed a check outside the workers (the console's) as ok, when the
    destination was not held before the check: only if it is still not held (a hold the
    workers confirmed while the check probed is theirs). True if recorded."""
    args = [x for kv in _ok_state(fingerprint).items() for x in kv]
    return bool(await redis.register_script(RECORD_OK_LUA)(keys=[keys.key_state], args=args))


def _ok_state(fingerprint: str) -> dict[str, str]:
    """The key state of a key that passed its check just now."""
    now = iso(now_ms()) or ""
    return {"state": "ok", "since": now, "checked_at": now, "fingerprint": fingerprint}


class KeyGuard:
    """Re-probes the key after key failures and holds all workers while it is broken."""

    def __init__(
        self,
        client: ConversionsClient,
        redis: aioredis.Redis,
        keys: RedisKeys,
        *,
        api_key: str,
        confirmations: int = 3,
        reprobe_interval_s: float = 30.0,
        min_probe_interval_s: float = 5.0,
        probe_pause_s: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.redis = redis
        self.keys = keys
        self._api_key = api_key
        self.confirmations = confirmations
        self.reprobe_interval_s = reprobe_interval_s
        self.min_probe_interval_s = min_probe_interval_s
        self.probe_pause_s = probe_pause_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._state_script = redis.register_script(STATE_LUA)
        self._lock_script = redis.register_script(LOCK_LUA)
        self._last_ok = float("-inf")
        self.held = False
        self._confirming = False

    async def check(self) -> KeyCheck:
        """The startup check; records the key as ok in Redis when it passes (and, while
        more probes confirm a key problem, that it is being confirmed)."""
        result = await self._probe()
        if result.ok:
            await self._set_ok()
        elif self._confirming:  # the caller holds the key, or refuses to start
            await self._unconfirming()
        return result

    async def confirm(self, error: SendError) -> Verdict:
        """Decide whether a key failure is transient; hold everything if it is not."""
        async with self._lock:
            if self.held:
                return Verdict.ALREADY_HELD
            # A key that passed a probe moments ago is not re-probed for a key failure (the
            # platform's spikes); a configuration failure (404, unknown pixel, a request
            # field) is always probed: retrying it blindly resends every batch meanwhile.
            recently_ok = (
                not error.reason.config_problem
                and self._monotonic() - self._last_ok < self.min_probe_interval_s
            )
            result = None if recently_ok else await self._probe()
            # Probes that met 429s, 5xx or lost answers say nothing about the key: only a
            # key problem answered to the probes themselves confirms one.
            if result is None or result.ok or (result.error is not None and result.error.retryable):
                await self._write_state(None, count_transient=True)
                await self._unconfirming()
                log.warning(
                    "transient %s on a key that passes its probe; retrying (request id %s)",
                    error.reason.value,
                    error.request_id,
                )
                return Verdict.TRANSIENT
            await self._hold(result.error or error)
            return Verdict.CONFIRMED

    async def sync(self) -> None:
        """Adopt the fleet's key state from Redis (another worker may have held or released);
        write it again if Redis lost it (a restart without persistence, a flush)."""
        state: bytes | None = await aw(self.redis.hget(self.keys.key_state, "state"))  # type: ignore[arg-type]
        await self.adopt(state)

    async def adopt(self, state: bytes | None) -> None:
        """Adopt a key state read from Redis (``state`` of the key hash; None if missing),
        as :meth:`sync` does: a worker reading many destinations' states at once calls it."""
        if state is None and not self.held and self._last_ok > float("-inf"):
            await self._set_ok()
            return
        self.held = state == b"held"

    async def try_release(self) -> bool:
        """While held: re-probe if no other worker did within the interval; True if released."""
        got = await self._lock_script(
            keys=[self.keys.probe_lock], args=[max(1, ms(self.reprobe_interval_s))]
        )
        if got:
            result = await self._probe(confirmations=1)
            if result.ok:
                await self._set_ok()
                log.warning("key re-probe passed: sending resumes")
                return True
            await self._state_script(
                keys=[self.keys.key_state, self.keys.stats],
                args=[0, 0, "checked_at", iso(now_ms()) or ""],
            )
        await self.sync()
        return not self.held

    async def _probe(self, confirmations: int | None = None) -> KeyCheck:
        result = await check_key(
            self.client,
            confirmations=confirmations or self.confirmations,
            pause_s=self.probe_pause_s,
            sleep=self._sleep,
            api_key=self._api_key,
            on_suspect=self._suspect,
        )
        if result.ok:
            self._last_ok = self._monotonic()
        return result

    async def _suspect(self, error: SendError) -> None:
        """A probe met a key problem that more probes are to confirm: say so beside the key
        state (``confirming_since``, ``confirming_reason``), which stays as it is until
        they decide (capi status and capi destinations show "confirming")."""
        if self.held:
            return
        self._confirming = True
        await self._state_script(
            keys=[self.keys.key_state, self.keys.stats],
            args=[0, 0, "confirming_since", iso(now_ms()) or "", "confirming_reason",
                  error.reason.value],
        )  # fmt: skip

    async def _unconfirming(self) -> None:
        """The probes decided without holding the key: the confirmation is over."""
        if self._confirming:
            self._confirming = False
            await aw(self.redis.hdel(self.keys.key_state, *CONFIRMING_FIELDS))

    async def _set_ok(self) -> None:
        self.held = False
        self._confirming = False  # the state below replaces the confirming fields
        await self._write_state(_ok_state(self.client.key_fingerprint))

    async def _write_state(
        self, state: dict[str, str] | None, *, count_transient: bool = False
    ) -> None:
        """Replace the key state (and count a transient failure); runs on a full Redis too."""
        fields = [x for kv in (state or {}).items() for x in kv]
        await self._state_script(
            keys=[self.keys.key_state, self.keys.stats],
            args=[1 if state else 0, 1 if count_transient else 0, *fields],
        )

    async def hold(self, check: KeyCheck) -> None:
        """Hold this destination after a failed key check (housekeeping re-probes it)."""
        assert check.error is not None
        await self._hold(check.error)

    async def _hold(self, error: SendError) -> None:
        self.held = True
        self._confirming = False  # the state below replaces the confirming fields
        diagnosis = diagnose(
            error, pixel_id=self.client.pixel_id, api_key=self._api_key, labels=self.client.labels
        )
        now = iso(now_ms()) or ""
        await self._write_state(
            {
                "state": "held",
                "since": now,
                "checked_at": now,
                "reason": error.reason.value,
                "status": str(error.status or ""),
                "request_id": error.request_id or "",
                "fingerprint": self.client.key_fingerprint,
                "pixel_id": self.client.pixel_id,
                "url": self.client.url,
                "guidance": diagnosis.text,
            }
        )
        where = "" if self.keys.destination == "default" else f" of {self.keys.destination}"
        what = "settings" if error.reason.config_problem else "key"
        log.error(
            "%s%s confirmed broken; holding all workers' sends%s: %s",
            what,
            where,
            where,
            diagnosis.cause,
            extra={"destination": self.keys.destination},
        )
