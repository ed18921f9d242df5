"""Normalize and hash user identifiers the way the Conversions API documents.

Each identifier is normalized, encoded as UTF-8 and hashed with SHA-256 (lowercase hex):

===========  ===============================================================
email        trim, lowercase; must look like ``local@domain``; a BOM or zero-width
             character is dropped, a control or bidi character refused
phone        drop spaces (any whitespace, no-break spaces too), ``()``, ``.``, ``-``,
             then a leading ``+`` and leading zeros; the country code stays; 8-15 digits
external id  trim only: case and inner characters are kept
first/last   Unicode NFC, lowercase, drop whitespace and ASCII punctuation, NFC again;
name         non-ASCII letters stay (``José`` -> ``josé``); a value with ``@`` is refused
             as an email given as a name
===========  ===============================================================

Already-hashed input, decided once: a value given under a raw field (``email``,
``phone``, ``external_id``, ``first_name``, ``last_name``) that is 64 hex characters is
refused, with a pointer to the matching ``*_sha256`` field, because hashing it again would
silently produce a value that never matches. Values given under ``*_sha256`` fields must be
64 hex characters and are passed through (lowercased), never hashed again.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Callable
from enum import StrEnum

_HEX_LENGTH = 64
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_WHITESPACE = re.compile(r"\s")  # for str patterns, exactly the characters str.isspace() accepts
_PHONE_SEPARATORS = str.maketrans("", "", "()-.")  # and every space (_WHITESPACE)
_NAME_DROP = str.maketrans("", "", string.punctuation)
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff]")  # zero-width, word joiner, BOM
_UNSEEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class Identifier(StrEnum):
    """A kind of raw identifier accepted under ``user``; the value is the raw field name."""

    EMAIL = "email"
    PHONE = "phone"
    EXTERNAL_ID = "external_id"
    FIRST_NAME = "first_name"
    LAST_NAME = "last_name"

    @property
    def hashed_field(self) -> str:
        """The API's list field that carries this identifier's hashes."""
        return _HASHED_FIELDS[self]


_HASHED_FIELDS = {
    Identifier.EMAIL: "emails_sha256",
    Identifier.PHONE: "phone_numbers_sha256",
    Identifier.EXTERNAL_ID: "external_ids_sha256",
    Identifier.FIRST_NAME: "first_names_sha256",
    Identifier.LAST_NAME: "last_names_sha256",
}


def is_sha256_hex(value: str) -> bool:
    """Whether value is 64 hexadecimal characters, the shape of a SHA-256 digest."""
    return _SHA256_HEX.fullmatch(value) is not None


def sha256_hex(normalized: str) -> str:
    """SHA-256 of the UTF-8 bytes of an already normalized value, as lowercase hex."""
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def normalize_email(value: str) -> str:
    """Trim and lowercase an email address; raise ValueError if it is not one. A byte order
    mark or zero-width character (copy-paste leaves them, invisible) is dropped wherever it
    is; a control or bidi character is refused."""
    email = value.strip().lower()
    if not email.isascii():
        email = _INVISIBLE.sub("", email).strip()
        unseen = _UNSEEN.search(email) is not None
    else:  # ASCII: printable but for the controls, NUL to US and DEL (all in _UNSEEN)
        unseen = not email.isprintable()
    if unseen:
        raise ValueError(
            "must be an email address like name@example.com; it holds a control or "
            "bidi (text direction) character"
        )
    local, at, domain = email.partition("@")
    if not at or not local or not domain or "@" in domain or _WHITESPACE.search(email):
        raise ValueError("must be an email address like name@example.com")
    return email


def normalize_phone(value: str) -> str:
    """Reduce a phone number to its digits with country code; raise ValueError if invalid."""
    # Spaces of every kind: number formatting puts no-break spaces between digit groups.
    digits = _WHITESPACE.sub("", value).translate(_PHONE_SEPARATORS)
    digits = digits.removeprefix("+").lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(
            "must be a phone number with country code: digits, spaces, ( ) . - and a leading +"
        )
    if not 8 <= len(digits) <= 15:
        raise ValueError(f"must have 8 to 15 digits including the country code, got {len(digits)}")
    return digits


def normalize_external_id(value: str) -> str:
    """Trim an external id, keeping its case and inner characters."""
    trimmed = value.strip()
    if not trimmed:
        raise ValueError("must not be empty")
    return trimmed


def normalize_name(value: str) -> str:
    """Lowercase a first or last name and drop whitespace and ASCII punctuation."""
    # NFC first: it can turn characters into ASCII punctuation (U+037E -> ";") to drop;
    # and last: dropping a space between two combining marks can leave them out of order.
    if "@" in value:
        raise ValueError("looks like an email address, not a name; put emails in user.email")
    lowered = unicodedata.normalize("NFC", value).lower()
    kept = "".join(c for c in lowered.translate(_NAME_DROP) if not c.isspace())
    name = unicodedata.normalize("NFC", kept)
    if not name:
        raise ValueError("must contain at least one letter")
    return name


NORMALIZERS: dict[Identifier, Callable[[str], str]] = {
    Identifier.EMAIL: normalize_email,
    Identifier.PHONE: normalize_phone,
    Identifier.EXTERNAL_ID: normalize_external_id,
    Identifier.FIRST_NAME: normalize_name,
    Identifier.LAST_NAME: normalize_name,
}


def hash_identifier(kind: Identifier, raw: str) -> str:
    """Normalize and hash one raw identifier; raise ValueError naming the rule it breaks."""
    return HASHERS[kind](raw)


def _hasher(kind: Identifier) -> Callable[[str], str]:
    normalize = NORMALIZERS[kind]
    hashed_field = kind.hashed_field

    def hashed(raw: str) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"must be a string, got {type(raw).__name__}")
        # Only 64 characters, once trimmed, can be a hash: the length first, it is free.
        if len(raw) >= _HEX_LENGTH and is_sha256_hex(raw.strip()):
            raise ValueError(
                f"looks already hashed (64 hex characters); pass it in user.{hashed_field} "
                "instead, so it is not hashed twice"
            )
        return sha256_hex(normalize(raw))

    return hashed


HASHERS: dict[Identifier, Callable[[str], str]] = {kind: _hasher(kind) for kind in Identifier}
""":func:`hash_identifier` of each kind, looked up once by callers that hash many values."""


def check_hashed(value: str) -> str:
    """Validate a value given as already hashed and return it lowercased."""
    if not isinstance(value, str) or not is_sha256_hex(value):
        raise ValueError("must be a SHA-256 hex digest (64 characters 0-9a-f)")
    return value.lower()
