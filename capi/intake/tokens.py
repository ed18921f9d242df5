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
import secrets
from collections.abc import Callable

from capi import destinations
from capi.settings import Settings

TOKEN_BYTES = 32


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
        digests = destinations.default_token_digests(settings)
        return {d: frozenset({destinations.DEFAULT_NAME}) for d in digests}
    text = destinations._read(path)
    grants: dict[str, set[str]] = {}
    for name, dest in destinations.parse(text, path, settings, {}, keys="skip").items():
        for d in dest.intake_tokens_sha256:
            grants.setdefault(d, set()).add(name)
    return {d: frozenset(names) for d, names in grants.items()}


class Grants(destinations.Following[dict[str, frozenset[str]]]):
    """The configured tokens' grants, by token digest, following the destinations file
    as it changes."""

    def __init__(self, settings: Settings, *, monotonic: Callable[[], float] | None = None):
        super().__init__(settings, read_grants, monotonic=monotonic)

    def granted(self, token: str) -> frozenset[str] | None:
        """The destinations ``token`` grants; None for a token that is not configured."""
        return self.current().get(digest(token))

    def destinations(self) -> list[str]:
        """Every destination some token grants."""
        return sorted({n for names in self.current().values() for n in names})
