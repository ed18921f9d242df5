"""Who may use the console: tokens, sessions, CSRF tokens and the limit on failed logins.

A console token is configured only as its SHA-256 with a role (``CAPI_CONSOLE_TOKENS_SHA256``
holds ``role:sha256hex`` entries): ``viewer`` reads, ``operator`` may also replay, purge and
check keys. The login form turns a token into a session: a random cookie whose SHA-256
names a Redis key (``{p}:console:session:{digest}``, see :mod:`capi.constants`) holding the
role, the token's SHA-256 and the session's CSRF token; it expires after
:data:`SESSION_TTL_S`. The cookie never holds the token, and a session whose token is no
longer configured stops working. Scripts send ``Authorization: Bearer <token>`` instead;
their CSRF token is derived from the token's SHA-256 and shown on every page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from capi.constants import RedisKeys

ROLES = ("viewer", "operator")
SESSION_TTL_S = 8 * 3600
SESSION_COOKIE = "capi_console"
LOGIN_COOKIE = "capi_console_login"  # the login form's CSRF token (double submit)
TOKEN_PREFIX = "capi_console_"  # noqa: S105 (a prefix that tells a token, no secret)


def new_token() -> str:
    """A new random console token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """The SHA-256 of a token, as configured."""
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(token_digest: str) -> str:
    """A short, non-reversible name for a token, for the audit: a prefix of its SHA-256
    (an operator finds the token's line in CAPI_CONSOLE_TOKENS_SHA256 by it)."""
    return f"console-token sha256:{token_digest[:8]}"


def configured(setting: str | None) -> dict[str, str]:
    """The configured tokens: SHA-256 -> role (the setting is validated on load)."""
    tokens = {}
    for item in (setting or "").split(","):
        role, _, hexdigest = item.strip().partition(":")
        if role in ROLES and hexdigest:
            tokens[hexdigest.lower()] = role
    return tokens


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a role, its token's SHA-256 and fingerprint, and the CSRF
    token its POSTs must carry."""

    role: str
    token_digest: str
    csrf: str
    via: str  # "session" or "bearer"

    @property
    def fingerprint(self) -> str:
        """The token's fingerprint, written to the audit."""
        return fingerprint(self.token_digest)

    @property
    def operator(self) -> bool:
        """Whether it may replay, purge and check keys."""
        return self.role == "operator"


def bearer(token: str, tokens: dict[str, str]) -> Principal | None:
    """The principal of a Bearer token, or None when it is not configured."""
    found = digest(token)
    role = tokens.get(found)
    if role is None:
        return None
    csrf = hashlib.sha256(b"capi-console-csrf:" + found.encode()).hexdigest()[:32]
    return Principal(role, found, csrf, "bearer")


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two CSRF tokens."""
    return bool(a) and hmac.compare_digest(a.encode(), b.encode())


class Sessions:
    """Login sessions in Redis, keyed by the SHA-256 of their cookie."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, ttl_s: int = SESSION_TTL_S):
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    def _key(self, cookie: str) -> str:
        return self.keys.console_session(digest(cookie))

    async def start(self, role: str, token_digest: str) -> str:
        """A new session for a token; its cookie value."""
        cookie = secrets.token_urlsafe(32)
        record = {"role": role, "token": token_digest, "csrf": secrets.token_urlsafe(24)}
        await self.redis.set(self._key(cookie), orjson.dumps(record), ex=self.ttl_s)
        return cookie

    async def read(self, cookie: str, tokens: dict[str, str]) -> Principal | None:
        """The session's principal; None when it expired, ended, or its token is no longer
        configured (or now has another role)."""
        raw = await self.redis.get(self._key(cookie))
        if not raw:
            return None
        record = orjson.loads(raw)
        if tokens.get(record["token"]) != record["role"]:
            return None
        return Principal(record["role"], record["token"], record["csrf"], "session")

    async def end(self, cookie: str) -> None:
        """End a session (log out)."""
        await self.redis.delete(self._key(cookie))


class LoginLimiter:
    """Failed logins (the form's or a Bearer token's) within ``window_s``: at most
    ``attempts`` per client address and ``total`` across all of them, kept in this process
    (the console is one process). Only failures count, and a configured token is checked
    before the limit, so the limit never locks out a valid token (console tokens hold 256
    random bits: guessing one is hopeless, the limit only spares the work and the logs).
    At most ``clients`` addresses are remembered; the one seen least recently is forgotten
    first, in constant time."""

    def __init__(
        self,
        attempts: int = 5,
        window_s: float = 60.0,
        total: int = 100,
        clients: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.total = total
        self.clients = clients
        self._monotonic = monotonic
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()

    def _recent(self, times: deque[float], now: float) -> deque[float]:
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def wait(self, client: str) -> float:
        """0 when a failure from ``client`` may be answered now; otherwise the seconds until
        one may (its own failures, or everyone's, reached the limit)."""
        now = self._monotonic()
        waits = []
        everyone = self._recent(self._all, now)
        if len(everyone) >= self.total:
            waits.append(everyone[0] + self.window_s - now)
        own = self._seen.get(client)
        if own is not None and len(self._recent(own, now)) >= self.attempts:
            waits.append(own[0] + self.window_s - now)
        return max(1.0, *waits) if waits else 0.0

    def failed(self, client: str) -> None:
        """Count a failed attempt from ``client``."""
        now = self._monotonic()
        self._all.append(now)
        own = self._seen.pop(client, None)
        self._seen[client] = self._recent(own if own is not None else deque(), now)
        self._seen[client].append(now)
        if len(self._seen) > self.clients:
            self._seen.popitem(last=False)
