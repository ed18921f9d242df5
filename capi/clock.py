"""Time in capi: one clock, one "now in ms", and the one liveness rule.

- :data:`Clock` is a function returning wall-clock seconds (``time.time``); code that reads
  the time takes one as a parameter, so tests can pass their own.
- :func:`now_ms` is the clock's time in Unix milliseconds, the unit of every timestamp in
  Redis and in the API's events; :func:`ms` turns a duration in seconds into milliseconds.
- Liveness: a running worker says it is alive every :data:`HEARTBEAT_S`: in its own memory
  (the event loop's beat, read by ``/healthz``) and in Redis (its heartbeat, read by
  ``capi status`` and by the other workers). One not heard from for :data:`LIVENESS_S`
  (five beats missed) is taken for stopped: ``capi status`` drops it, the other workers may
  take over its entries once they are also idle for ``CAPI_CLAIM_IDLE_S``, and its own
  ``/healthz`` fails. Redis counts as answering a worker (``/readyz``) while it answered
  within the same window.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

HEARTBEAT_S = 1.0
LIVENESS_S = 5.0
LIVENESS_MS = 5_000


def now_ms(clock: Clock = time.time) -> int:
    """The clock's time in Unix milliseconds."""
    return ms(clock())


def ms(seconds: float) -> int:
    """A time or duration in seconds, in whole milliseconds."""
    return int(seconds * 1000)
