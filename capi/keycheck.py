"""The key check: prove the Conversion Key can write events before trusting it.

One ``validate_only`` request with a synthetic signup: the API checks it without saving it,
and such requests never show in monitoring. Failures that may be spurious (missing scope,
RBAC denials, unauthorized, and anything retryable: 429, 5xx, network) are probed again a
few times before the check calls the key broken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from capi.client import ConversionsClient
from capi.clock import Clock, now_ms
from capi.errors import SendError
from capi.guidance import Diagnosis, diagnose_probe

Sleep = Callable[[float], Awaitable[None]]


def synthetic_event(clock: Clock = time.time) -> bytes:
    """A valid signup that exists only to be validated (never saved: validate_only)."""
    ts = now_ms(clock)
    return (
        b'{"id":"capi-key-check-%d","type":"registration_completed","timestamp_ms":%d,'
        b'"action_source":"web","source_url":"https://example.com/capi-key-check",'
        b'"data":{"type":"customer_action"}}' % (ts, ts)
    )


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The outcome of a key check: ok, or the last error and its diagnosis."""

    ok: bool
    key_fingerprint: str
    pixel_id: str
    error: SendError | None = None
    diagnosis: Diagnosis | None = None
    request_ids: dict[str, str] = field(default_factory=dict)
    probes: int = 1


async def probe(client: ConversionsClient, *, clock: Clock = time.time) -> SendError | None:
    """One validate_only request; None when the key can write events."""
    try:
        await client.send([synthetic_event(clock)], validate_only=True)
    except SendError as exc:
        return exc
    return None


async def check_key(
    client: ConversionsClient,
    *,
    confirmations: int = 3,
    pause_s: float = 0.5,
    clock: Clock = time.time,
    sleep: Sleep = asyncio.sleep,
    api_key: str | None = None,
    on_suspect: Callable[[SendError], Awaitable[None]] | None = None,
) -> KeyCheck:
    """Probe the key until it passes or fails ``confirmations`` times in a row; a failure
    that is never spurious (unknown pixel, an unexpected answer) ends the check at once.
    A key problem is confirmed only when no probe met a failure that says nothing about
    the key (429, 5xx, a lost answer); when one did, the check's error is the last such
    failure, so that a platform hiccup among scope failures never holds a key (503, 429,
    then a missing scope was reported as a missing scope).

    ``on_suspect`` is awaited once, at the first key problem that more probes are to
    confirm (so that the wait can be shown as such)."""
    error: SendError | None = None
    inconclusive: SendError | None = None  # the last probe failure that says nothing
    suspected = False
    for attempt in range(1, confirmations + 1):
        error = await probe(client, clock=clock)
        if error is None:
            return KeyCheck(True, client.key_fingerprint, client.pixel_id, probes=attempt)
        if not (error.retryable or error.reason.maybe_transient):
            break
        if error.retryable:
            inconclusive = error
        if attempt < confirmations:
            if on_suspect is not None and not suspected and not error.retryable:
                suspected = True
                await on_suspect(error)
            await sleep(pause_s * attempt)
    else:
        error = inconclusive or error
    assert error is not None
    return KeyCheck(
        False,
        client.key_fingerprint,
        client.pixel_id,
        error=error,
        diagnosis=diagnose_probe(
            error, pixel_id=client.pixel_id, api_key=api_key, labels=client.labels
        ),
        request_ids=error.response.request_ids,
        probes=attempt,
    )
