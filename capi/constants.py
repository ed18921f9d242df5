"""Every Redis key capi uses, and the fixed limits of the API.

Redis layout (``{p}`` is the prefix, ``capi`` unless ``CAPI_REDIS_PREFIX`` says otherwise)::

    {p}:events              STREAM  queued events; fields: e=event JSON, t=timestamp_ms,
                                    i=event id, n=attempts so far (retries only),
                                    m=retry metadata JSON (retries only)
    {p}:events  group "senders"     the consumer group the workers read through
    {p}:retry               ZSET    member = JSON list of retry entries, score = due time (ms)
    {p}:dd:{bucket}:{shard} STRING  16-byte digests of "{name}:{id}" enqueued in one quarter
                                    of the dedup window (see capi.dedup); expires with it
    {p}:dl                  HASH    "{name}:{id}" -> dead letter record JSON
    {p}:dl:index            ZSET    "{name}:{id}", score = dead-lettered at (ms)
    {p}:dl:replays          LIST    replay audit entries (JSON), newest first
    {p}:stats               HASH    counters: enqueued, delivered, retried, dead_lettered,
                                    transient_key_failures, requests, accepted_mismatches
    {p}:stats:dl_reasons    HASH    dead-letter reason -> count
    {p}:key                 HASH    key state: state (ok|held), since, reason, fingerprint,
                                    checked_at, guidance
    {p}:key:probe-lock      STRING  held while one worker re-probes the key (rate limit)
    {p}:workers             ZSET    worker name, score = last heartbeat (ms)
    {p}:workers:state       HASH    worker name -> JSON {state, since_ms, detail}
    {p}:endpoint            HASH    failing_since (ms, while sends fail transiently),
                                    last_error, last_error_ms, last_ok_ms

Nothing here ever holds the Conversion Key or a raw identifier.
"""

from __future__ import annotations

from dataclasses import dataclass

API_MAX_EVENTS_PER_REQUEST = 1000
API_MAX_BODY_BYTES = 4 * 1024 * 1024  # undocumented; integrators cap here
MAX_EVENT_BYTES = 256 * 1024  # ours: a single event this large is a bug upstream
API_MAX_AGE_MS = 7 * 24 * 3600 * 1000
API_MAX_FUTURE_MS = 10 * 60 * 1000
# An event this close to the API's 7-day limit is not sent: it would arrive too old.
STALE_MARGIN_MS = 60_000
CONVERSIONS_SCOPE = "ads.third_party_events.write"
DEFAULT_BASE_URL = "https://bzr.openai.com"
EVENTS_PATH = "/v1/events"
CONSUMER_GROUP = "senders"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The names of capi's Redis keys under one prefix."""

    prefix: str = "capi"

    @property
    def stream(self) -> str:
        """The stream of queued events."""
        return f"{self.prefix}:events"

    @property
    def retry(self) -> str:
        """The sorted set of scheduled retries."""
        return f"{self.prefix}:retry"

    @property
    def dedup_prefix(self) -> str:
        """The prefix of the dedup record's shard strings (``{p}:dd:{bucket}:{shard}``)."""
        return f"{self.prefix}:dd:"

    @property
    def deadletters(self) -> str:
        """The hash of dead letter records."""
        return f"{self.prefix}:dl"

    @property
    def deadletter_index(self) -> str:
        """The sorted set ordering dead letters by time."""
        return f"{self.prefix}:dl:index"

    @property
    def replays(self) -> str:
        """The replay audit list."""
        return f"{self.prefix}:dl:replays"

    @property
    def stats(self) -> str:
        """The hash of counters."""
        return f"{self.prefix}:stats"

    @property
    def dl_reasons(self) -> str:
        """The hash of dead letter counts by reason."""
        return f"{self.prefix}:stats:dl_reasons"

    @property
    def key_state(self) -> str:
        """The hash describing whether the Conversion Key currently works."""
        return f"{self.prefix}:key"

    @property
    def probe_lock(self) -> str:
        """The lock that rate-limits key re-probes across workers."""
        return f"{self.prefix}:key:probe-lock"

    @property
    def workers(self) -> str:
        """The sorted set of worker heartbeats."""
        return f"{self.prefix}:workers"

    @property
    def worker_states(self) -> str:
        """The hash of what each worker is doing."""
        return f"{self.prefix}:workers:state"

    @property
    def endpoint(self) -> str:
        """The hash describing whether the events endpoint is failing."""
        return f"{self.prefix}:endpoint"
