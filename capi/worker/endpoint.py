"""A destination's endpoint as one worker sees it: whether it is failing, since when, its
last error, and whether a delivery ends an outage.

The endpoint is *failing* from the first failure that says it is down (5xx, network; a 429
is "slow down", not "down") until the next delivery, or until it answers a probe that the
worker sends while the destination has nothing left to send
(:meth:`capi.worker.sender.Sender.probe_endpoint`). Said in the log when it starts and
once a minute while it lasts (a flapping endpoint is not said on every flap). A delivery
after failures that lasted ``OUTAGE_RELEASE_S`` or more ends an *outage*: the sender then
releases every scheduled retry at once (:meth:`capi.queue.Queue.release_retries`); a
shorter failure is a hiccup, and backoff stands.
"""

from __future__ import annotations

import logging
import time

from capi.clock import Clock
from capi.errors import SendError
from capi.metrics import DestinationMetrics

log = logging.getLogger("capi.sender")

ENDPOINT_REMIND_S = 60.0
OUTAGE_RELEASE_S = 5.0


class Endpoint:
    """The endpoint state of one destination's sender; written by its own methods only."""

    def __init__(self, metrics: DestinationMetrics, clock: Clock = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._failing_since: float | None = None
        self._last_error = ""
        self._reminded = 0.0

    @property
    def failing(self) -> bool:
        """Whether the endpoint failed since its last delivery."""
        return self._failing_since is not None

    def describe(self) -> str:
        """``the endpoint is failing since T (last error ...)``, or empty when it is not."""
        if self._failing_since is None:
            return ""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._failing_since))
        return f"the endpoint is failing since {since} (last error {self._last_error})"

    def failed(self, err: SendError) -> None:
        """A send failed because the endpoint is down."""
        now = time.monotonic()
        self._last_error = str(err)[:300]
        if self._failing_since is None:
            self._failing_since = self._clock()
            self._metrics.endpoint_failing_since.set(self._failing_since)
        if now - self._reminded >= ENDPOINT_REMIND_S:
            self._reminded = now
            log.error("%s; events are kept and retried", self.describe())

    def delivered(self, failing_since_ms: int | None) -> float | None:
        """A delivery (or an answer to a probe): the endpoint answers. ``failing_since_ms``
        is when Redis says it began failing (any worker's failures), if it was. How long the
        failures lasted if this ends an outage (``OUTAGE_RELEASE_S`` or more), else None."""
        local = self._failing_since
        self._failing_since = None
        self._metrics.endpoint_failing_since.set(0)
        starts = [t for t in (local, failing_since_ms and failing_since_ms / 1000) if t]
        lasted = self._clock() - min(starts) if starts else 0.0
        if lasted < OUTAGE_RELEASE_S:
            return None
        self._reminded = 0.0
        return lasted
