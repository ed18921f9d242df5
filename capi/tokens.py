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

:class:`Grants` reads the file again when it changes (looked at at most once a second),
like :class:`capi.destinations.Names`; a broken file keeps the last good grants.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable

from capi import destinations
from capi.errors import ConfigError
from capi.settings import Settings

TOKEN_BYTES = 32
_SHA256_HEX = re.compile(destinations.SHA256_HEX)


def new_token() -> str:
    """A new intake token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def digest(token: str) -> str:
    """The SHA-256 of a token, as 64 lowercase hex characters (what configuration holds)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def read_grants(settings: Settings) -> dict[str, frozenset[str]]:
    """Each configured token digest and the destinations it grants; ConfigError names what
    is wrong. Reads no Conversion Key (the intake needs none)."""
    path = destinations.source(settings)
    if path is None:
        digests = _default_digests(settings)
        return {d: frozenset({destinations.DEFAULT_NAME}) for d in digests}
    text = destinations._read(path)
    grants: dict[str, set[str]] = {}
    for name, dest in destinations.parse(text, path, settings, {}, keys="skip").items():
        for d in dest.intake_tokens_sha256:
            grants.setdefault(d, set()).add(name)
    return {d: frozenset(names) for d, names in grants.items()}


def _default_digests(settings: Settings) -> list[str]:
    digests = [t.strip() for t in (settings.intake_tokens_sha256 or "").split(",") if t.strip()]
    for d in digests:
        if not _SHA256_HEX.match(d):
            raise ConfigError(
                "CAPI_INTAKE_TOKENS_SHA256: comma-separated SHA-256 digests, 64 lowercase hex "
                "characters each (capi intake-token prints the line to paste)"
            )
    return digests


class Grants:
    """The configured tokens' grants, following the destinations file as it changes."""

    def __init__(self, settings: Settings, *, monotonic: Callable[[], float] | None = None):
        self.settings = settings
        self._monotonic = monotonic or time.monotonic
        self._checked = self._monotonic()
        self._stamp = self._file_stamp()
        self._grants = read_grants(settings)

    def _file_stamp(self) -> tuple[str, float] | None:
        path = destinations.source(self.settings)
        try:
            return (str(path), path.stat().st_mtime) if path is not None else None
        except OSError:
            return None

    def current(self) -> dict[str, frozenset[str]]:
        """The grants now, by token digest (a broken file keeps the last good ones)."""
        now = self._monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                try:
                    self._grants = read_grants(self.settings)
                    self._stamp = stamp
                except ConfigError:
                    pass
        return self._grants

    def granted(self, token: str) -> frozenset[str] | None:
        """The destinations ``token`` grants; None for a token that is not configured."""
        return self.current().get(digest(token))

    def destinations(self) -> list[str]:
        """Every destination some token grants."""
        return sorted({n for names in self.current().values() for n in names})
