"""Every Redis key capi uses, and the fixed limits of the API.

Redis layout. ``{p}`` is the prefix (``capi`` unless ``CAPI_REDIS_PREFIX`` says otherwise);
``{d}`` is a destination's namespace: ``{p}`` itself for the destination ``default``,
``{p}:d:{name}`` for any other (see ``config/destinations.toml``). On a Redis Cluster
(``CAPI_REDIS_CLUSTER=true``) every destination's namespace is ``{p}:d:{{name}}``, the
default's too: the name in braces is the hash tag, so all of one destination's keys share
a slot (each script stays single-slot) while destinations spread over the shards; the
shared keys below are ``{p}:{{p}}:...`` there, in one slot of their own::

    {d}:events              STREAM  queued events; fields: e=event JSON, t=timestamp_ms,
                                    i=event id, k=identifier kinds (bits, capi.coverage),
                                    n=attempts so far (retries only),
                                    m=retry metadata JSON (retries only)
    {d}:events  group "senders"     the consumer group the workers read through
    {d}:retry               ZSET    member = JSON {u, entries: [...], ra: 1 if the wait is the
                                    server's Retry-After}, score = due time (ms)
    {d}:dd:{bucket}:{shard} STRING  16-byte digests of "{name}:{id}" enqueued in one quarter
                                    of the dedup window (see capi.dedup); expires with it
    {d}:dl                  HASH    "{name}:{id}" -> dead letter record JSON
    {d}:dl:index            ZSET    "{name}:{id}", score = dead-lettered at (ms)
    {d}:dl:replays          LIST    replay audit entries (JSON), newest first
    {d}:stats               HASH    counters: enqueued, duplicates (enqueues the dedup
                                    window refused), delivered, validated (test mode),
                                    retried, dead_lettered, transient_key_failures,
                                    requests, accepted_mismatches, skipped (consent
                                    denied under consent_policy drop)
    {d}:stats:dl_reasons    HASH    dead-letter reason -> count
    {d}:coverage:{hour}     HASH    deliveries in one hour (since the epoch): events, and per
                                    identifier kind how many carried it (capi.coverage);
                                    expires after 25 hours
    {d}:key                 HASH    key state: state (ok|held), since, reason, fingerprint,
                                    checked_at, guidance
    {d}:key:probe-lock      STRING  held while one worker re-probes the key (rate limit)
    {p}:active              SET     destinations whose stream may hold entries no worker has
                                    read: added with every write to a stream, removed by
                                    the read that finds a stream empty (both atomic; on a
                                    cluster see capi.index), so idle destinations' streams
                                    are not polled
    {d}:armed               STRING  cluster only: "1" while the destination may have unread
                                    entries; set by every write to its stream, cleared by
                                    the read that finds it empty (capi.index)
    {p}:wake                STREAM  a destination name each time one becomes active; every
                                    worker blocks on it (XREAD) while it has nothing to do
    {p}:retry-due           ZSET    destination, score = its earliest scheduled retry (ms);
                                    housekeeping moves due retries only where one is due
    {p}:workers             ZSET    worker name, score = last heartbeat (ms)
    {p}:workers:state       HASH    worker name -> JSON {state, since_ms, detail}
    {d}:endpoint            HASH    failing_since (ms, while sends fail transiently),
                                    last_error, last_error_ms, last_ok_ms
    {d}:tail                STREAM  the most recent outcomes, PII-free (see capi.tail),
                                    capped with MAXLEN ~ CAPI_TAIL_ENTRIES
    {p}:console:session:{digest}
                            STRING  a console login session (capi.console.auth): JSON {role,
                                    token (the token's SHA-256), csrf}, keyed by the SHA-256
                                    of the session cookie; expires with the session

Nothing here ever holds the Conversion Key, a console token or a raw identifier.
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
    """The names of capi's Redis keys under one prefix, for one destination.

    Each destination has keys of its own, ``{p}:d:{name}:...``; the destination
    ``default`` (the one a single-pixel set-up has) keeps the plain ``{p}:...`` names, so
    events queued before destinations existed are still sent. Worker heartbeats, the active
    set, the wake stream and the retry-due index are shared by all destinations.

    With ``cluster`` (a Redis Cluster) each destination's keys carry its name as their hash
    tag and the shared keys the prefix as theirs (see the module docstring).
    """

    prefix: str = "capi"
    destination: str = "default"
    cluster: bool = False

    @property
    def ns(self) -> str:
        """The namespace of this destination's keys."""
        if self.cluster:
            return f"{self.prefix}:d:{{{self.destination}}}"
        if self.destination == "default":
            return self.prefix
        return f"{self.prefix}:d:{self.destination}"

    @property
    def shared(self) -> str:
        """The namespace of the keys every destination shares."""
        return f"{self.prefix}:{{{self.prefix}}}" if self.cluster else self.prefix

    def for_destination(self, name: str) -> RedisKeys:
        """The keys of another destination under the same prefix."""
        return RedisKeys(self.prefix, name, self.cluster)

    @property
    def armed(self) -> str:
        """Cluster only: set while this destination may have unread entries (capi.index)."""
        return f"{self.ns}:armed"

    @property
    def stream(self) -> str:
        """The stream of queued events."""
        return f"{self.ns}:events"

    @property
    def retry(self) -> str:
        """The sorted set of scheduled retries."""
        return f"{self.ns}:retry"

    @property
    def dedup_prefix(self) -> str:
        """The prefix of the dedup record's shard strings (``{d}:dd:{bucket}:{shard}``)."""
        return f"{self.ns}:dd:"

    @property
    def deadletters(self) -> str:
        """The hash of dead letter records."""
        return f"{self.ns}:dl"

    @property
    def deadletter_index(self) -> str:
        """The sorted set ordering dead letters by time."""
        return f"{self.ns}:dl:index"

    @property
    def replays(self) -> str:
        """The replay audit list."""
        return f"{self.ns}:dl:replays"

    @property
    def stats(self) -> str:
        """The hash of counters."""
        return f"{self.ns}:stats"

    def coverage(self, hour: int) -> str:
        """The hash of one hour's match-coverage counts (hours since the epoch)."""
        return f"{self.ns}:coverage:{hour}"

    @property
    def dl_reasons(self) -> str:
        """The hash of dead letter counts by reason."""
        return f"{self.ns}:stats:dl_reasons"

    @property
    def key_state(self) -> str:
        """The hash describing whether the Conversion Key currently works."""
        return f"{self.ns}:key"

    @property
    def probe_lock(self) -> str:
        """The lock that rate-limits key re-probes across workers."""
        return f"{self.ns}:key:probe-lock"

    @property
    def active(self) -> str:
        """The set of destinations that may have unread entries (shared)."""
        return f"{self.shared}:active"

    @property
    def wake(self) -> str:
        """The stream that wakes idle workers when a destination becomes active (shared)."""
        return f"{self.shared}:wake"

    @property
    def retry_due(self) -> str:
        """The sorted set of destinations by their earliest scheduled retry (shared)."""
        return f"{self.shared}:retry-due"

    @property
    def workers(self) -> str:
        """The sorted set of worker heartbeats."""
        return f"{self.shared}:workers"

    @property
    def worker_states(self) -> str:
        """The hash of what each worker is doing."""
        return f"{self.shared}:workers:state"

    @property
    def tail(self) -> str:
        """The ring of recent outcomes read by ``capi tail`` (see :mod:`capi.tail`)."""
        return f"{self.ns}:tail"

    @property
    def endpoint(self) -> str:
        """The hash describing whether the events endpoint is failing."""
        return f"{self.ns}:endpoint"

    def console_session(self, digest: str) -> str:
        """A console login session, by the SHA-256 of its cookie (shared)."""
        return f"{self.prefix}:console:session:{digest}"
