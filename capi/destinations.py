"""Destinations: the pixels (and their Conversion Keys) one deployment sends to.

A destination is a name, a pixel id, where its Conversion Key comes from (a variable, set
in the environment or in the config file ``config/capi.env`` as settings are, or a file:
never the TOML itself), an optional ``integration_source`` and base
URL, and the SHA-256 of the intake tokens granted it. They are read from
``config/destinations.toml``, or the file named by ``CAPI_DESTINATIONS_FILE``::

    [destinations.brand-a]
    pixel_id = "pix_a"
    api_key_env = "CAPI_KEY_BRAND_A"        # or: api_key_file = "/run/secrets/brand-a"
    integration_source = "acme-platform"    # optional
    # base_url = "https://bzr.openai.com"   # optional
    intake_tokens_sha256 = ["<64 hex>"]     # optional
    consent_policy = "drop"                 # optional: "drop" | "opt_out"
    consent_default = "granted"             # optional: "granted" | "denied"

Without the file, ``CAPI_API_KEY`` and ``CAPI_PIXEL_ID`` form the one destination
``default`` (and ``CAPI_INTAKE_TOKENS_SHA256`` lists its tokens), so a single-pixel set-up
needs no file. :func:`load` refuses a broken file with :class:`~capi.errors.ConfigError`
naming the file, the line and the rule; a caller that already runs keeps its old
destinations meanwhile.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from capi.constants import DEFAULT_BASE_URL
from capi.errors import ConfigError
from capi.fingerprint import fingerprint, looks_like_key, pixel_problem, shape_problem
from capi.safetext import shown
from capi.settings import Settings, checked_base_url

T = TypeVar("T")
log = logging.getLogger("capi.destinations")

DEFAULT_FILE = Path("config/destinations.toml")
DEFAULT_NAME = "default"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SHA256_HEX = r"^[0-9a-f]{64}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class _Entry(BaseModel):
    """One ``[destinations.NAME]`` table, as written."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    pixel_id: str = Field(min_length=1, max_length=200)
    api_key_env: str | None = Field(None, pattern=ENV_NAME)
    api_key_file: Path | None = None
    integration_source: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    intake_tokens_sha256: list[str] = []
    consent_policy: Literal["drop", "opt_out"] | None = None
    consent_default: Literal["granted", "denied"] | None = None
    validate_only: bool = False
    advertiser_key_env: str | None = Field(None, pattern=ENV_NAME)
    advertiser_key_file: Path | None = None
    ads_api_base_url: str | None = Field(None, pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")

    @field_validator("pixel_id")
    @classmethod
    def _pixel_id(cls, value: str) -> str:
        return checked_pixel_id(value)

    @field_validator("api_key_env", "advertiser_key_env", mode="before")
    @classmethod
    def _a_variable(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not re.match(ENV_NAME, value.strip()):
            what = "key itself" if looks_like_key(value.strip()) else "value"
            raise ValueError(
                "is the name of the environment variable that holds the key (letters, digits "
                f"and _, such as CAPI_KEY_BRAND_A), not the {what}: keys never go in this "
                f"file; set the variable, or name a file with "
                f"{str(info.field_name).removesuffix('_env')}_file (the value is not shown)"
            )
        return value

    @field_validator("api_key_file", "advertiser_key_file")
    @classmethod
    def _a_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and looks_like_key(str(value)):
            env = str(info.field_name).removesuffix("_file") + "_env"
            raise ValueError(
                "holds what looks like a key itself (it starts with sk-), not the path of a "
                "file that holds it: put the key in a file and name the file here, or in an "
                f"environment variable named by {env} (the value is not shown)"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return None if value is None else checked_base_url(value)

    @model_validator(mode="after")
    def _one_key_source(self) -> _Entry:
        if (self.api_key_env is None) == (self.api_key_file is None):
            raise ValueError("give exactly one of api_key_env and api_key_file")
        if self.advertiser_key_env is not None and self.advertiser_key_file is not None:
            raise ValueError("give at most one of advertiser_key_env and advertiser_key_file")
        for token in self.intake_tokens_sha256:
            if not re.match(SHA256_HEX, token):
                raise ValueError(
                    "intake_tokens_sha256 holds SHA-256 digests: 64 lowercase hex characters "
                    "each (capi intake-token --write adds one)"
                )
        return self


def checked_pixel_id(value: str) -> str:
    """``value`` if it can be a pixel id (it is printed and sent as ?pid=); ValueError if
    it holds a space, a control character or an invisible formatting character, or is
    shaped like a key (never quoted then)."""
    if problem := pixel_problem(value, "it"):
        raise ValueError(problem)
    if any(c.isspace() for c in value) or shown(value) != value:
        raise ValueError(
            f"{shown(value)[:80]!r} is not a pixel id: no spaces, control characters or "
            "invisible (bidi, zero-width) characters; copy it from Ads Manager -> Conversions"
        )
    return value


@dataclass(frozen=True)
class Consent:
    """What a destination does with an event whose consent is denied (``policy``), and the
    consent of an event that carries none (``default``)."""

    policy: Literal["drop", "opt_out"] = "drop"
    default: Literal["granted", "denied"] = "granted"

    def fate(self, given: str | None) -> Literal["send", "drop", "opt_out"]:
        """What becomes of an event with consent ``given`` (None: not given)."""
        if (given or self.default) == "granted":
            return "send"
        return self.policy


@dataclass(frozen=True)
class Destination:
    """One pixel to send to, with its key (never shown: see :attr:`key_fingerprint`)."""

    name: str
    pixel_id: str
    api_key: str = field(repr=False)
    key_source: str
    base_url: str = DEFAULT_BASE_URL
    integration_source: str | None = None
    intake_tokens_sha256: frozenset[str] = frozenset()
    consent: Consent = Consent()
    validate_only: bool = False  # test mode: the API checks every batch and saves nothing
    reads: ReadBack | None = None  # the Advertiser API key for capi verify, when configured

    @property
    def key_fingerprint(self) -> str:
        """The key's fingerprint, the only form in which it is ever shown."""
        return fingerprint(self.api_key)


@dataclass(frozen=True)
class ReadBack:
    """Where ``capi verify`` reads a destination's events back: the Advertiser API, with an
    Advertiser API key (never the Conversion Key, never shown)."""

    base_url: str
    api_key: str = field(repr=False)
    key_source: str


NAMES_SHOWN = 10  # names listed in one line of output or one answer; the rest are counted


def listed(names: Iterable[str]) -> str:
    """Destination names for a line of output or an answer: sorted, the first
    :data:`NAMES_SHOWN` of them, then how many more (a deployment may have thousands)."""
    ordered = sorted(set(names))
    more = len(ordered) - NAMES_SHOWN
    return ", ".join(ordered[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def source(settings: Settings) -> Path | None:
    """The destinations file in use: ``CAPI_DESTINATIONS_FILE``, or
    ``config/destinations.toml`` if it exists; None without one."""
    if settings.destinations_file is not None:
        return Path(settings.destinations_file)
    return DEFAULT_FILE if DEFAULT_FILE.exists() else None


def load(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, Destination]:
    """The configured destinations by name; ConfigError names what is wrong, and where.

    A key named by ``api_key_env`` is looked up in ``environ``: by default the environment
    and the config file (``config/capi.env``), the environment winning, as for settings."""
    environ = settings.environ() if environ is None else environ
    path = source(settings)
    if path is None:
        return {DEFAULT_NAME: default(settings)}
    return parse(_read(path), path, settings, environ, where=settings.config_source())


def parse_file(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Destination]:
    """Like :func:`load`, but a key that cannot be read here is left empty rather than
    refused (for listing destinations on a host that does not hold every key)."""
    environ = settings.environ() if environ is None else environ
    path = source(settings)
    if path is None:
        try:
            return {DEFAULT_NAME: default(settings)}
        except ConfigError:
            reads = default_reads(settings)
            return {
                DEFAULT_NAME: Destination(
                    DEFAULT_NAME, settings.pixel_id or "", "", "", reads=reads
                )
            }
    return parse(
        _read(path), path, settings, environ, keys="optional", where=settings.config_source()
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(
            f"CAPI_DESTINATIONS_FILE: cannot read {path.absolute()} ({why})"
        ) from None


def file_stamp(settings: Settings) -> tuple[str, float] | None:
    """The destinations file in use and its modification time (None without a file, or
    when it cannot be read): what tells that the file changed."""
    path = source(settings)
    try:
        return (str(path), path.stat().st_mtime) if path is not None else None
    except OSError:
        return None


class Following(Generic[T]):
    """What ``read`` makes of the destinations file, read again when the file changes
    (looked at at most once a second; ``stamp`` tells a change, :func:`file_stamp` unless
    given). A broken file goes to :meth:`broken`, which logs it and keeps the last good
    result unless a subclass decides otherwise."""

    def __init__(
        self,
        settings: Settings,
        read: Callable[[Settings], T],
        *,
        monotonic: Callable[[], float] | None = None,
        stamp: Callable[[Settings], object] | None = None,
    ) -> None:
        self.settings = settings
        self._read = read
        self._stamp_of: Callable[[Settings], object] = stamp or file_stamp
        self._monotonic = monotonic or time.monotonic
        self._checked = self._monotonic()
        self._stamp = self._stamp_of(settings)
        self._value = read(settings)

    def current(self) -> T:
        """The result now."""
        now = self._monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            stamp = self._stamp_of(self.settings)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._value = self._read(self.settings)
                except ConfigError as exc:
                    self._value = self.broken(self._value, exc)
        return self._value

    def broken(self, last: T, exc: ConfigError) -> T:
        """The result while the file is broken (``exc`` says how): the last good one."""
        log.error("%s; keeping the destinations read before until it is fixed", exc)
        return last


class Names(Following[list[str]]):
    """The configured destinations' names, following the file, for long-lived producers."""

    def __init__(self, settings: Settings, *, monotonic: Callable[[], float] | None = None):
        super().__init__(settings, names, monotonic=monotonic)


class Consents(Following[dict[str, Consent]]):
    """Each destination's consent rules by name, following the file, for producers."""

    def __init__(self, settings: Settings, *, monotonic: Callable[[], float] | None = None):
        super().__init__(settings, consents, monotonic=monotonic)


def consents(settings: Settings) -> dict[str, Consent]:
    """Each configured destination's consent rules, without reading any key."""
    path = source(settings)
    if path is None:
        return {DEFAULT_NAME: _consent(None, settings)}
    return {n: d.consent for n, d in parse(_read(path), path, settings, {}, keys="skip").items()}


def _consent(entry: _Entry | None, settings: Settings) -> Consent:
    """A destination's consent rules: its own, else CAPI_CONSENT_POLICY / _DEFAULT."""
    return Consent(
        policy=(entry and entry.consent_policy) or settings.consent_policy,
        default=(entry and entry.consent_default) or settings.consent_default,
    )


def names(settings: Settings) -> list[str]:
    """The configured destinations' names, without reading any key (producers need no key)."""
    path = source(settings)
    if path is None:
        return [DEFAULT_NAME]
    return list(parse(_read(path), path, settings, {}, keys="skip"))


def parse(
    text: str,
    path: Path,
    settings: Settings,
    environ: Mapping[str, str],
    *,
    keys: Literal["required", "optional", "skip"] = "required",
    where: str = "the environment",
) -> dict[str, Destination]:
    """The destinations of one TOML text (``path`` only names it in errors). Each key is
    read and must be usable (``required``), is left empty when it cannot be read here
    (``optional``), or is not read at all (``skip``); ``where`` says where ``environ``
    comes from, for the message about a variable that is not set."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: is not valid TOML: {exc}") from None
    unknown = set(data) - {"destinations"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level table {sorted(unknown)[0]!r}; every table is "
            "[destinations.NAME]"
        )
    tables = data.get("destinations")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: names no destination; add a [destinations.NAME] table")
    out: dict[str, Destination] = {}
    lines = _header_lines(text)
    for name, table in tables.items():
        at = f"{path}:{lines.get(name, 1)}: [destinations.{name}]"
        if not NAME.fullmatch(name):
            raise ConfigError(
                f"{at}: a destination name is 1-63 lowercase letters, digits, - or _, "
                "starting with a letter or digit"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: must be a table of settings")
        try:
            entry = _Entry.model_validate(table)
        except ValidationError as exc:
            raise ConfigError(f"{at}: {_first(exc)}") from None
        key, key_source = "", ""
        if keys != "skip":
            try:
                key, key_source = _key(entry, at, environ, where)
            except ConfigError:
                if keys == "required":
                    raise
        out[name] = Destination(
            name=name,
            pixel_id=entry.pixel_id,
            api_key=key,
            key_source=key_source,
            base_url=(entry.base_url or settings.base_url).rstrip("/"),
            integration_source=entry.integration_source or settings.integration_source,
            intake_tokens_sha256=frozenset(entry.intake_tokens_sha256),
            consent=_consent(entry, settings),
            validate_only=entry.validate_only,
            reads=_reads(entry, settings, environ) if keys != "skip" else None,
        )
    return out


def _reads(entry: _Entry, settings: Settings, environ: Mapping[str, str]) -> ReadBack | None:
    """The destination's read-back key, from its own advertiser_key_env or _file (None when
    neither is given; an empty key when the variable is unset or the file unreadable, which
    capi verify reports naming the source)."""
    base = (entry.ads_api_base_url or settings.ads_api_base_url).rstrip("/")
    if entry.advertiser_key_env:
        value = environ.get(entry.advertiser_key_env, "").strip()
        source = f"${entry.advertiser_key_env}"
    elif entry.advertiser_key_file:
        try:
            value = entry.advertiser_key_file.read_text().strip()
        except OSError:
            value = ""
        source = str(entry.advertiser_key_file)
    else:
        return None
    return ReadBack(base, value, source)


def default_token_digests(settings: Settings) -> list[str]:
    """The intake token digests granted ``default`` (CAPI_INTAKE_TOKENS_SHA256)."""
    digests = [t.strip() for t in (settings.intake_tokens_sha256 or "").split(",") if t.strip()]
    for d in digests:
        if not re.match(SHA256_HEX, d):
            raise ConfigError(
                "CAPI_INTAKE_TOKENS_SHA256: comma-separated SHA-256 digests, 64 lowercase hex "
                "characters each (capi intake-token --write adds one)"
            )
    return digests


def default(settings: Settings) -> Destination:
    """The destination ``default``: CAPI_API_KEY, CAPI_PIXEL_ID and the other settings."""
    api_key, pixel_id = settings.credentials()
    tokens = default_token_digests(settings)
    return Destination(
        name=DEFAULT_NAME,
        pixel_id=pixel_id,
        api_key=api_key,
        key_source="CAPI_API_KEY",
        base_url=settings.base_url,
        integration_source=settings.integration_source,
        intake_tokens_sha256=frozenset(tokens),
        consent=_consent(None, settings),
        validate_only=settings.validate_only,
        reads=default_reads(settings),
    )


def default_reads(settings: Settings) -> ReadBack | None:
    """The read-back of ``default``: CAPI_ADVERTISER_KEY at CAPI_ADS_API_BASE_URL."""
    if settings.advertiser_key is None:
        return None
    key = settings.advertiser_key.get_secret_value().strip()
    return ReadBack(settings.ads_api_base_url.rstrip("/"), key, "CAPI_ADVERTISER_KEY")


def _key(entry: _Entry, where: str, environ: Mapping[str, str], source: str) -> tuple[str, str]:
    if entry.api_key_env is not None:
        key = environ.get(entry.api_key_env, "").strip()
        label = f"${entry.api_key_env}"
        if not key:
            raise ConfigError(
                f"{where}: api_key_env names {entry.api_key_env}, which is not set (looked "
                f"for in {source})"
            )
    else:
        assert entry.api_key_file is not None
        label = str(entry.api_key_file)
        try:
            key = entry.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"{where}: cannot read api_key_file {label} ({why})") from None
    if problem := shape_problem(key):
        problem = problem.replace("the CAPI_API_KEY= line of the config file", "its own line")
        raise ConfigError(f"{where}: the key in {label} {problem}")
    return key, label


def key_variables(settings: Settings) -> set[str]:
    """The variables the destinations file names in ``api_key_env`` (read loosely, so that a
    broken file still tells them): known names, not typos of settings."""
    path = source(settings)
    try:
        text = path.read_text(encoding="utf-8") if path is not None else ""
    except (OSError, UnicodeDecodeError):
        return set()
    return set(re.findall(r"^\s*api_key_env\s*=\s*[\"']([A-Za-z0-9_]+)[\"']", text, re.MULTILINE))


_HEADER = re.compile(
    r"^[ \t]*\[[ \t]*destinations[ \t]*\.[ \t]*(\"?)([^\]\"\n]*?)\1[ \t]*\]", re.MULTILINE
)


def _header_lines(text: str) -> dict[str, int]:
    """The line of each ``[destinations.NAME]`` header, in one pass over the text (a name
    not found, e.g. in an inline table, is told as line 1). A search of the whole text per
    destination took seconds for a file of 1,000 destinations, on every command."""
    found: dict[str, int] = {}
    line, counted = 1, 0
    for match in _HEADER.finditer(text):
        line += text.count("\n", counted, match.start())
        counted = match.start()
        found.setdefault(match.group(2), line)
    return found


def _first(exc: ValidationError) -> str:
    # A misspelled name first: its 'Field required' twin (pixelid for pixel_id) says less.
    errors = exc.errors(include_url=False, include_input=False)
    err: dict[str, Any] = dict(min(errors, key=lambda e: e["type"] != "extra_forbidden"))
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, sorted(_Entry.model_fields), n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]}?"
            if close
            else "a destination's settings are " + ", ".join(_Entry.model_fields)
        )
        return f"{loc}: is not a setting of a destination; {hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
