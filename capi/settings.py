"""Settings, read from ``CAPI_*`` environment variables or an env file under ``config/``.

Nothing is read at import time: call :meth:`Settings.load`. The file is ``$CAPI_CONFIG_FILE``
if set, else ``config/capi.env`` (relative to the current directory) if it exists; the
environment wins over the file. Messages about missing settings say which file was looked for.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from dotenv import dotenv_values
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from capi.constants import (
    API_MAX_EVENTS_PER_REQUEST,
    DEFAULT_BASE_URL,
    EVENTS_PATH,
    RedisKeys,
)
from capi.errors import ConfigError
from capi.fingerprint import pixel_problem, shape_problem
from capi.redisconn import (
    Sentinels,
    async_client,
    connection_kwargs,
    parse_cluster_nodes,
    parse_sentinels,
    sync_client,
)

DEFAULT_CONFIG_FILE = Path("config/capi.env")
# CAPI_* names that are not settings yet are known: the config file's name, and the two
# that docker-compose.yml reads (from .env) to configure the containers.


class _NameTheFile(logging.Filter):
    """python-dotenv warns of a line it cannot parse without naming the file, and again each
    time the file is read: name the file, and say it once per line."""

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.seen: set[tuple[Path, object]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.path is None or not str(record.msg).startswith("python-dotenv could not parse"):
            return True
        line = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        if (self.path, line) in self.seen:
            return False
        self.seen.add((self.path, line))
        record.msg = "warning: %s line %s is ignored: it is not NAME=value (comments start with #)"
        record.args = (self.path, line)
        return True


_dotenv_lines = _NameTheFile()
logging.getLogger("dotenv.main").addFilter(_dotenv_lines)

NOT_SETTINGS = frozenset({"CAPI_CONFIG_FILE", "CAPI_ENV_FILE", "CAPI_REDIS_PASSWORD"})


class Settings(BaseSettings):
    """Every setting of capi; each maps to ``CAPI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CAPI_", extra="ignore", validate_default=True)

    api_key: SecretStr | None = Field(None, description="The Conversion Key.")
    pixel_id: str | None = Field(None, description="The pixel id, sent as ?pid=.")
    base_url: str = Field(DEFAULT_BASE_URL, description="The events endpoint's base URL.")
    redis_url: str = Field("redis://localhost:6379/0", description="Where the queue lives.")
    redis_sentinels: str | None = Field(
        None,
        description="Redis Sentinels (host:port, comma-separated): capi finds the master "
        "through them and follows a failover; CAPI_REDIS_URL then gives only the password, "
        "TLS options and database.",
    )
    redis_sentinel_master: str | None = Field(
        None,
        pattern=r"^[^\s,]{1,200}$",
        description="The name the sentinels know the master by (sentinel monitor NAME ...).",
    )
    redis_cluster: bool = Field(
        False,
        description="CAPI_REDIS_URL names a node of a Redis Cluster: each destination's keys "
        "share one hash tag, so destinations spread over the shards (see docs/scaling.md).",
    )
    redis_cluster_nodes: str | None = Field(
        None,
        description="More nodes of the Redis Cluster (host:port, comma-separated) to read its "
        "layout from when CAPI_REDIS_URL's node does not answer (its host lost, say).",
    )
    redis_prefix: str = Field("capi", min_length=1, description="Prefix of every Redis key.")
    integration_source: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Sent to the API as is."
    )
    max_attempts: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Optional cap on sends per event; unset, the budget is the event's "
        "7-day window (a transient failure never dead-letters an event that can still go).",
    )
    retry_base_s: float = Field(1.0, gt=0, description="First backoff wait.")
    retry_cap_s: float = Field(300.0, gt=0, description="Longest single backoff wait.")
    batch_size: int = Field(
        500, ge=1, le=API_MAX_EVENTS_PER_REQUEST, description="Events per POST."
    )
    batch_wait_ms: int = Field(50, ge=0, le=60_000, description="Longest wait to fill a batch.")
    concurrency: int = Field(
        2,
        ge=1,
        le=32,
        description="Batches in flight per destination (a worker runs 4x as many lanes).",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="HTTP timeout per request.")
    claim_idle_s: float = Field(
        90.0, gt=0, description="Idle time after which a dead worker's events are reclaimed."
    )
    dedup_window_s: int = Field(
        86_400, ge=0, description="Window in which a repeated id is dropped."
    )
    reprobe_interval_s: float = Field(30.0, gt=0, description="Key re-probe period while held.")
    probe_confirmations: int = Field(
        3, ge=1, le=10, description="Failed probes in a row that confirm a key problem."
    )
    shutdown_timeout_s: float = Field(20.0, ge=0, description="Grace for in-flight batches.")
    deadletter_retention_days: float = Field(30.0, gt=0, description="How long dead letters stay.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics, /healthz, /readyz on this port."
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Longest wait for Redis to connect or answer one call."
    )
    enqueue_durability: Literal["memory", "aof", "replica"] = Field(
        "memory",
        description="When enqueue returns: once Redis has the event in memory, once it is "
        "in Redis's append-only file (WAITAOF), or once a replica has it (WAIT).",
    )
    durability_timeout_ms: int = Field(
        1000, ge=1, le=60_000, description="Longest wait for enqueue_durability."
    )
    destinations_file: Path | None = Field(
        None,
        description="The destinations file (pixels and their keys); without it "
        "config/destinations.toml if present, else CAPI_API_KEY + CAPI_PIXEL_ID are the "
        "destination 'default'.",
    )
    intake_tokens_sha256: str | None = Field(
        None, description="SHA-256 of the intake tokens granted 'default', comma-separated."
    )
    validate_only: bool = Field(
        False,
        description="Test mode: every batch is sent with validate_only (the API checks each "
        "event and saves nothing); outcomes are counted as validated, never delivered.",
    )
    tail_entries: int = Field(
        200,
        ge=0,
        le=100_000,
        description="Entries (of up to 100 outcomes each) kept per destination for capi tail; "
        "0 turns the ring off.",
    )
    advertiser_key: SecretStr | None = Field(
        None,
        description="An Advertiser API key (Ads Manager -> Settings -> API keys), for capi "
        "verify's read-back; never the Conversion Key.",
    )
    ads_api_base_url: str = Field(
        "https://api.ads.openai.com",
        pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
        description="The Advertiser API's base URL (event monitoring, for capi verify).",
    )
    intake_max_body_bytes: int = Field(
        4_000_000,
        ge=1024,
        le=100_000_000,
        description="Largest request body capi serve reads; a larger one gets 413.",
    )
    intake_max_events: int = Field(
        1000, ge=1, le=100_000, description="Most events in one capi serve request (else 413)."
    )
    intake_group_events: int = Field(
        256,
        ge=0,
        le=100_000,
        description="Most events of concurrent capi serve requests sent to Redis in one round "
        "trip (0: a round trip per request).",
    )
    intake_read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Longest capi serve waits for a request's body; a slower one gets 408.",
    )
    intake_max_connections: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Most connections capi serve holds at once (per process); at the limit "
        "a new one closes the connection waiting longest with no request being answered "
        "(503 only when every connection has one).",
    )
    intake_max_header_bytes: int = Field(
        16_384,
        ge=1024,
        le=1_048_576,
        description="Largest request line and headers capi serve reads (else 431).",
    )
    intake_header_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Longest capi serve waits for a request's line and headers from their "
        "first byte (else 408).",
    )
    intake_idle_timeout_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How long capi serve keeps a connection that sends nothing, before its "
        "first request or between keep-alive requests.",
    )
    intake_max_buffered_bytes: int = Field(
        64_000_000,
        ge=1_000_000,
        le=10_000_000_000,
        description="Most request-body bytes capi serve holds at once across connections "
        "(per process; each request's first 64 KiB aside); a body beyond gets 503.",
    )
    trusted_proxies: str | None = Field(
        None,
        description="Comma-separated addresses (or CIDR networks) of reverse proxies whose "
        "X-Forwarded-For capi serve believes; unset, it believes none.",
    )
    console_tokens_sha256: str | None = Field(
        None,
        description="capi console's tokens: role:sha256hex entries (role viewer or "
        "operator), comma-separated; capi console-token makes one.",
    )
    console_hosts: str | None = Field(
        None,
        description="Host names capi console answers to (comma-separated, e.g. "
        "console.example.com,127.0.0.1); a request for another Host gets 400. Unset, any.",
    )
    console_secure_cookies: bool = Field(
        False,
        description="Mark capi console's cookies Secure (and name them __Host-...) on every "
        "answer; set it when the console is reached over HTTPS only.",
    )
    intake_retry_after_s: int = Field(
        2, ge=1, le=3600, description="Retry-After of capi serve's 503 while Redis is away."
    )
    strict_key_check: bool = Field(
        False,
        description="Refuse to start a worker unless every destination's key passes "
        "(with one destination a broken key always refuses the start).",
    )
    strict_identifiers: bool = Field(
        False,
        description="Refuse an event over an invalid optional identifier (email, phone, "
        "country, ...) instead of leaving that identifier out with a warning.",
    )
    consent_policy: Literal["drop", "opt_out"] = Field(
        "drop",
        description="What an event whose consent is denied becomes: never sent (drop), or "
        "sent with opt_out: true and without obref (opt_out). Destinations file: "
        "consent_policy.",
    )
    consent_default: Literal["granted", "denied"] = Field(
        "granted",
        description="The consent of an event that carries none. Destinations file: "
        "consent_default.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Worker log lines.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the metrics server binds; 0.0.0.0 to let other hosts scrape it.",
    )
    _config_file: Path | None = PrivateAttr(None)
    _config_found: bool = PrivateAttr(False)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() show the Redis URL without its password (the key is a SecretStr).
        for name, value in super().__repr_args__():
            yield name, (safe_url(value) if name == "redis_url" else value)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return checked_base_url(value)

    @field_validator("pixel_id")
    @classmethod
    def _not_a_key(cls, value: str | None) -> str | None:
        if value is not None and (problem := pixel_problem(value, "it")):
            raise ValueError(problem)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str | None) -> str | None:
        for item in (value or "").split(","):
            if item.strip():
                try:
                    ipaddress.ip_network(item.strip())
                except ValueError:
                    raise ValueError(
                        f"{item.strip()[:60]!r} is not an IP address or network (CIDR); give "
                        "the reverse proxies' addresses, comma-separated, e.g. 10.0.0.5,10.1.0.0/16"
                    ) from None
        return value

    @field_validator("console_tokens_sha256")
    @classmethod
    def _console_tokens(cls, value: str | None) -> str | None:
        for item in (value or "").split(","):
            role, _, digest = item.strip().partition(":")
            if item.strip() and (
                role not in ("viewer", "operator") or not re.fullmatch(r"[0-9a-f]{64}", digest)
            ):
                raise ValueError(
                    f"{item.strip()[:20]!r}... is not role:sha256hex; give entries such as "
                    "operator:<64 hex>, comma-separated (capi console-token prints one)"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if value.startswith("unix://"):
            connection_kwargs(value, 1.0)
            return value
        parts = urlsplit(value)
        if "@" in parts.path or "@" in parts.fragment or "@" in parts.query.partition("=")[0]:
            # The host ended at a / ? or # of the password: the rest of it would be read
            # (and quoted below) as the port or the database.
            raise ValueError(
                "the password (or user name) holds a /, ? or # character: percent-encode "
                "it (/ as %2F, ? as %3F, # as %23); the URL is not shown"
            )
        try:
            bad_port = parts.port == 0
        except ValueError:
            bad_port = True
        if bad_port:
            port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
            raise ValueError(
                f"the port {port[:12]!r} must be a number from 1 to 65535, as in "
                "redis://localhost:6379/0"
            ) from None
        db = parts.path.strip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(
                f"the database {db[:12]!r} must be a number (0 to 15 on a default Redis), as "
                "in redis://localhost:6379/0"
            )
        try:
            connection_kwargs(value, 1.0)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("CAPI_REDIS_URL ")) from None
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes")
    @classmethod
    def _address_list(cls, value: str | None, info: ValidationInfo) -> str | None:
        """host:port lists: of the sentinels, or of more nodes of a cluster."""
        if value is not None:
            (parse_sentinels if info.field_name == "redis_sentinels" else parse_cluster_nodes)(
                value
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError(
                "CAPI_REDIS_SENTINELS and CAPI_REDIS_SENTINEL_MASTER go together: set both "
                "(the sentinels' host:port list and the master's name) or neither"
            )
        if self.redis_sentinels and self.redis_url.startswith("unix://"):
            raise ValueError(
                "CAPI_REDIS_URL must be redis:// or rediss:// with CAPI_REDIS_SENTINELS (the "
                "sentinels name the master's host and port; the URL gives its password, TLS "
                "and database)"
            )
        if self.redis_cluster:
            self._check_cluster()
        elif self.redis_cluster_nodes:
            raise ValueError(
                "CAPI_REDIS_CLUSTER_NODES names nodes of a Redis Cluster: it needs "
                "CAPI_REDIS_CLUSTER=true"
            )
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("CAPI_RETRY_CAP_S must not be below CAPI_RETRY_BASE_S")
        if self.claim_idle_s <= self.request_timeout_s:
            raise ValueError(
                "CAPI_CLAIM_IDLE_S must be longer than CAPI_REQUEST_TIMEOUT_S, or events of a "
                "slow request would be taken over while still in flight"
            )
        return self

    def _check_cluster(self) -> None:
        if self.redis_sentinels:
            raise ValueError(
                "CAPI_REDIS_CLUSTER and CAPI_REDIS_SENTINELS exclude each other: a Redis "
                "Cluster fails over by itself (set one or the other)"
            )
        if self.redis_url.startswith("unix://"):
            raise ValueError(
                "CAPI_REDIS_URL must be redis:// or rediss:// with CAPI_REDIS_CLUSTER (a node "
                "of the cluster, host:port)"
            )
        if urlsplit(self.redis_url).path.strip("/") not in ("", "0"):
            raise ValueError(
                "CAPI_REDIS_URL must name database 0 (or none) with CAPI_REDIS_CLUSTER: a "
                "Redis Cluster has only database 0"
            )
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ValueError(
                "CAPI_REDIS_PREFIX must not hold { or } with CAPI_REDIS_CLUSTER: capi puts "
                "each destination's name in braces (its hash tag)"
            )

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Read settings from the environment and the config file; raise ConfigError if bad."""
        named = config_file or os.environ.get("CAPI_CONFIG_FILE")
        path = Path(named or DEFAULT_CONFIG_FILE)
        env_file = path if path.exists() else None
        if named and env_file is None:
            raise ConfigError(
                f"config file {path.absolute()} does not exist (named by --config or "
                "CAPI_CONFIG_FILE; a relative path is taken from the current directory)"
            )
        if env_file is not None:
            _dotenv_lines.path = env_file.absolute()
        try:
            settings = cls(_env_file=env_file, **overrides)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        settings._config_file = path.absolute()
        settings._config_found = env_file is not None
        return settings

    def config_file(self) -> Path | None:
        """The config file these settings were read from (None if there was none)."""
        return self._config_file if self._config_found else None

    def config_source(self) -> str:
        """Where settings come from, for messages: the environment, and which file."""
        if self._config_file is None:
            return "the environment"
        if self._config_found:
            return f"the environment or {self._config_file}"
        return (
            f"the environment ({self._config_file} was looked for and does not exist: it is "
            "taken from the current directory; run capi where config/ is, or name the file "
            "with --config or CAPI_CONFIG_FILE)"
        )

    def config_file_path(self) -> str | None:
        """The config file read (absolute), or None when there is none."""
        return str(self._config_file) if self._config_found else None

    def file_values(self) -> dict[str, str]:
        """The variables of the config file as settings read them (empty without a file)."""
        if not self._config_found or self._config_file is None:
            return {}
        values = dotenv_values(self._config_file, encoding="utf-8")
        return {k: v for k, v in values.items() if v is not None}

    def environ(self) -> dict[str, str]:
        """Variables as settings see them: the config file's, the environment winning (a
        destination's ``api_key_env`` is looked up here)."""
        return {**self.file_values(), **os.environ}

    def unknown_variables(self, also_known: Iterable[str] = ()) -> list[str]:
        """A warning for each ``CAPI_*`` variable in the environment or the config file that
        is no setting (and not in ``also_known``): it is ignored, which a typo should not be."""
        known = {f"CAPI_{name.upper()}" for name in type(self).model_fields} | NOT_SETTINGS
        known |= {n.upper() for n in also_known}
        found = [(n, "the environment") for n in os.environ]
        found += [(n, str(self._config_file)) for n in self.file_values()]
        warnings = []
        for name, where in found:
            prefixed = f"CAPI_{name.upper()}"
            setting = name.lower() in type(self).model_fields
            if where != "the environment" and setting and name not in also_known:
                # API_KEY=... in the config file: read by nothing (the environment holds
                # names of other programs, the file only capi's).
                warnings.append(
                    f"{name} (in {where}) is not read: capi's settings carry the CAPI_ "
                    f"prefix; did you mean {prefixed}?"
                )
                continue
            if not name.upper().startswith("CAPI_") or name.upper() in known:
                continue
            if name.upper().startswith("CAPI_KEY_"):
                # The product's own name for a destination's key: no typo of a setting.
                warnings.append(
                    f"{name} (in {where}) is named by no api_key_env of a destinations file, "
                    "so nothing uses it"
                )
                continue
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see config/capi.env.example"
            warnings.append(f"{name} (in {where}) is not a capi setting and is ignored; {hint}")
        return warnings

    @property
    def sentinels(self) -> Sentinels | None:
        """The sentinels and their master's name, when capi finds Redis through them."""
        if not self.redis_sentinels or not self.redis_sentinel_master:
            return None
        return Sentinels(parse_sentinels(self.redis_sentinels), self.redis_sentinel_master)

    @property
    def cluster_nodes(self) -> tuple[tuple[str, int], ...]:
        """The nodes of CAPI_REDIS_CLUSTER_NODES (none when unset)."""
        return parse_cluster_nodes(self.redis_cluster_nodes) if self.redis_cluster_nodes else ()

    def async_redis(self, **extra: Any) -> aioredis.Redis:
        """An asyncio Redis client for CAPI_REDIS_URL (or the sentinels' master, or the
        cluster that URL's node belongs to), every call bounded by the timeout."""
        return async_client(
            self.redis_url,
            self.redis_timeout_s,
            self.sentinels,
            cluster=self.redis_cluster,
            nodes=self.cluster_nodes,
            **extra,
        )

    def sync_redis(self, **extra: Any) -> redis.Redis:
        """A blocking Redis client for CAPI_REDIS_URL (or the sentinels' master), every
        call bounded by the timeout."""
        return sync_client(
            self.redis_url,
            self.redis_timeout_s,
            self.sentinels,
            cluster=self.redis_cluster,
            nodes=self.cluster_nodes,
            **extra,
        )

    @property
    def keys(self) -> RedisKeys:
        """The Redis key names under this prefix."""
        return RedisKeys(self.redis_prefix, cluster=self.redis_cluster)

    def credentials(self) -> tuple[str, str]:
        """The key and pixel id; raise ConfigError naming whichever is missing."""
        missing = [
            name
            for name, value in (("CAPI_API_KEY", self.api_key), ("CAPI_PIXEL_ID", self.pixel_id))
            if not value
        ]
        if missing:
            where = {
                "CAPI_API_KEY": "the key is a Conversion Key from Ads Manager -> Conversions -> "
                "Manage conversion keys",
                "CAPI_PIXEL_ID": "the pixel id is in Ads Manager -> Conversions (a pixel of "
                "the key's ad account)",
            }
            raise ConfigError(
                f"{' and '.join(missing)} must be set, in {self.config_source()}; "
                + "; ".join(where[name] for name in missing)
            )
        assert self.api_key is not None and self.pixel_id is not None
        key = self.api_key.get_secret_value().strip()
        if problem := shape_problem(key or self.api_key.get_secret_value()):
            raise ConfigError(f"CAPI_API_KEY {problem} (the key is not shown)")
        return key, self.pixel_id.strip()


def checked_base_url(value: str) -> str:
    """A base URL of the events endpoint, without its trailing slash; ValueError if it is
    not http(s), or holds ``user@`` (httpx would send that as Basic auth in place of the
    key), or a space or control character in its host."""
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError(
            "must not hold user@ or user:password@ before the host: it would be sent as "
            "Basic auth in place of the Conversion Key (the key comes from its own setting)"
        )
    try:
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if not parts.hostname or any(c.isspace() or not c.isprintable() for c in parts.netloc):
        raise ValueError("must name a host, with no space or control character in it")
    if parts.path.rstrip("/").endswith(EVENTS_PATH):
        raise ValueError(
            f"must be the base URL without {EVENTS_PATH} (capi appends it), e.g. {DEFAULT_BASE_URL}"
        )
    return value.rstrip("/")


def safe_url(url: str) -> str:
    """A URL fit to print: any password in it replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        name = "CAPI_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "settings"
        lines.append(f"{name}: {str(err['msg']).removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(lines)
