"""Intake tokens: the bearer tokens of ``capi serve``, and which destinations each grants.

A token is a random string (:func:`new_token`) that the operator hands to one client; the
configuration holds only its SHA-256 (``intake_tokens_sha256`` of a destination in the
destinations file, or ``CAPI_INTAKE_TOKENS_SHA256`` for ``default`` without a file). A
token listed under several destinations grants each of them.

Checking a token hashes what the client presented and looks the digest up in a dict. That
is constant-time where it matters: the lookup's timing depends only on the digest of the
attacker's own guess, and learning how ``sha256(guess)`` compares with a stored digest
says nothing usable about the token behind it (finding an input whose digest shares a
prefix with it gives no step toward a preimage). ``hmac.compare_digest`` against every
configured digest would be as safe, but linear in their number.

:class:`Grants` reads the file again when it changes (looked at at most once a second):
the destinations file, or without one the config file's CAPI_INTAKE_TOKENS_SHA256. A broken
file keeps only the grants whose digest is still in its text (fail closed: a removal
always revokes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable

from dotenv import dotenv_values

from capi import destinations
from capi.errors import ConfigError
from capi.settings import Settings

log = logging.getLogger("capi.intake")
ENV_NAME = "CAPI_INTAKE_TOKENS_SHA256"

TOKEN_BYTES = 32


def new_token() -> str:
    """A new intake token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def digest(token: str) -> str:
    """The SHA-256 of a token, as 64 lowercase hex characters (what configuration holds)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def read_grants(settings: Settings, *, warn: bool = True) -> dict[str, frozenset[str]]:
    """Each configured token digest and the destinations it grants; ConfigError names what
    is wrong. Reads no Conversion Key (the intake needs none). Without a destinations file
    the digests are CAPI_INTAKE_TOKENS_SHA256 as the config file says it now (unless the
    environment sets it). With one, a CAPI_INTAKE_TOKENS_SHA256 that grants nothing is
    logged as a warning (:func:`warn_if_ignored`), unless not ``warn``."""
    path = destinations.source(settings)
    if path is None:
        digests = destinations.default_token_digests(_fresh(settings))
        return {d: frozenset({destinations.DEFAULT_NAME}) for d in digests}
    if warn:
        warn_if_ignored(settings)
    text = destinations._read(path)
    grants: dict[str, set[str]] = {}
    for name, dest in destinations.parse(text, path, settings, {}, keys="skip").items():
        for d in dest.intake_tokens_sha256:
            grants.setdefault(d, set()).add(name)
    return {d: frozenset(names) for d, names in grants.items()}


def warn_if_ignored(settings: Settings) -> None:
    """Log a warning if CAPI_INTAKE_TOKENS_SHA256 is set beside a destinations file, where
    it grants nothing."""
    path = destinations.source(settings)
    if path is not None and _fresh(settings).intake_tokens_sha256:
        log.warning(
            "CAPI_INTAKE_TOKENS_SHA256 grants nothing while a destinations file is in use "
            "(%s): its tokens answer 401; grant them in intake_tokens_sha256 of a destination",
            path,
        )


def _fresh(settings: Settings) -> Settings:
    """``settings`` with CAPI_INTAKE_TOKENS_SHA256 read again from the config file."""
    path = settings.config_file()
    if ENV_NAME in os.environ or path is None:
        return settings
    try:
        value = dotenv_values(path).get(ENV_NAME)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({type(exc).__name__})") from None
    return settings.model_copy(update={"intake_tokens_sha256": value})


def _stamp(settings: Settings) -> object:
    """What tells that the grants may have changed: the destinations file's or, without
    one, the config file's modification time."""
    if destinations.source(settings) is not None:
        return destinations.file_stamp(settings)
    path = settings.config_file()
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _config_text(settings: Settings) -> str:
    """The text of the file the grants come from ("" if it cannot be read)."""
    path = destinations.source(settings) or settings.config_file()
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path is not None else ""
    except OSError:
        return ""


class Grants(destinations.Following[dict[str, frozenset[str]]]):
    """The configured tokens' grants, by token digest, following the destinations file
    (or, without one, the config file) as it changes. With ``warned`` (``capi serve`` said
    it at start, once for all its processes), the first read does not warn of
    CAPI_INTAKE_TOKENS_SHA256 granting nothing; a read after a change does."""

    def __init__(
        self,
        settings: Settings,
        *,
        monotonic: Callable[[], float] | None = None,
        warned: bool = False,
    ):
        first = [warned]

        def read(settings: Settings) -> dict[str, frozenset[str]]:
            said, first[0] = first[0], False
            return read_grants(settings, warn=not said)

        super().__init__(settings, read, monotonic=monotonic, stamp=_stamp)

    def broken(
        self, last: dict[str, frozenset[str]], exc: ConfigError
    ) -> dict[str, frozenset[str]]:
        """While the file is broken, a token stays granted only if its digest is still in
        the file's text: removing a digest revokes it even when the same edit breaks the
        file (fail closed); digests added by that edit wait until it reads again."""
        text = _config_text(self.settings)
        kept = {d: names for d, names in last.items() if d in text}
        log.error(
            "%s; intake tokens: keeping %d whose digest is still in the file, revoking %d "
            "removed from it; new ones wait until the file reads again",
            exc,
            len(kept),
            len(last) - len(kept),
        )
        return kept

    def granted(self, token: str) -> frozenset[str] | None:
        """The destinations ``token`` grants; None for a token that is not configured."""
        return self.current().get(digest(token))

    def granted_digest(self, token_digest: str) -> frozenset[str] | None:
        """:meth:`granted`, for a token whose :func:`digest` is already known."""
        return self.current().get(token_digest)

    def destinations(self) -> list[str]:
        """Every destination some token grants."""
        return sorted({n for names in self.current().values() for n in names})
