"""Identify a Conversion Key without revealing it, check its shape, guess its type from it,
and redact it from text and bytes.

A fingerprint is the key's last four characters plus a short SHA-256 prefix, e.g.
``…x9Qa (sha256:1f2e3d4c)``: enough to tell two keys apart in logs, dead letters and
support tickets, never enough to use.
"""

from __future__ import annotations

import hashlib
import unicodedata

import orjson

# No key prefix is documented. These shapes only sharpen guidance; none rejects a key.
_WRONG_TYPE_HINTS: tuple[tuple[str, str], ...] = (
    ("sk-proj-", "an OpenAI platform project key (sk-proj-)"),
    ("sk-admin-", "an OpenAI platform admin key (sk-admin-)"),
    ("sk-None-", "an OpenAI platform user key (sk-None-)"),
)
CONVERSION_KEY_SHAPE = "sk-svcacct-"


def fingerprint(key: str) -> str:
    """Return a short, non-reversible identifier for a key."""
    if not key:
        return "(no key)"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    tail = key[-4:] if len(key) >= 12 else ""
    return f"…{tail} (sha256:{digest})" if tail else f"(sha256:{digest})"


def shape_hint(key: str) -> str | None:
    """One sentence on what a key's prefix suggests, or None when the shape says nothing."""
    for prefix, kind in _WRONG_TYPE_HINTS:
        if key.startswith(prefix):
            return f"This key is shaped like {kind}, not like a Conversion Key."
    if key.startswith(CONVERSION_KEY_SHAPE):
        return (
            f"This key has the {CONVERSION_KEY_SHAPE} shape guides show for Conversion Keys, "
            "so its type is probably right: see the next steps."
        )
    if key.startswith("sk-"):
        return "This key is shaped like an OpenAI platform key (sk-), not like a Conversion Key."
    return None


def redact(text: str, key: str) -> str:
    """Replace every occurrence of the key in text by its fingerprint."""
    if key and key in text:
        return text.replace(key, f"<key {fingerprint(key)}>")
    return text


def redact_bytes(data: bytes, key: str) -> bytes:
    """Replace every occurrence of the key in bytes (raw, or as escaped in JSON) by its
    fingerprint."""
    if not key:
        return data
    raw = key.encode("utf-8", "replace")
    escaped = orjson.dumps(key)[1:-1]
    for form in {raw, escaped}:
        if form in data:
            data = data.replace(form, f"<key {fingerprint(key)}>".encode())
    return data


def looks_like_key(value: str) -> bool:
    """Whether ``value`` is shaped like an OpenAI key (``sk-...``): given where something
    else goes (a pixel id, a key file's path), it must be refused without being quoted."""
    return value.strip().startswith("sk-")


def pixel_problem(value: str, setting: str) -> str | None:
    """Why ``value``, given as the pixel id in ``setting``, must not be used, without quoting
    it; None if nothing. A value shaped like an OpenAI key (``sk-...``) is the Conversion Key
    given as the pixel id (the two settings swapped): it would be sent as ``?pid=`` and shown
    and stored wherever the pixel id is (status, dead letters, the key state)."""
    if looks_like_key(value):
        return (
            f"{setting} holds what looks like a key (it starts with sk-), not a pixel id: were "
            "the key and the pixel id swapped? (the value is not shown; the pixel id is in "
            "Ads Manager -> Conversions)"
        )
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        return (
            f"{setting} is in quotes ({value[:80]!r}): the quotes were taken as part of it "
            "(`docker run --env-file` keeps them, for one); remove them"
        )
    return None


def shape_problem(key: str) -> str | None:
    """What makes a key unusable before any request, without quoting it; None if nothing.

    A key is sent in an HTTP header, so it must be printable ASCII without spaces: a line
    break or NUL (a paste that took more than the key) would be refused by the HTTP library
    with an error that shows the header, and a non-ASCII character (a smart quote) cannot
    be encoded at all.
    """
    if not key.strip():
        return "is empty or only whitespace"
    quotes = "\"'"
    if key[0] in quotes or key[-1] in quotes:
        position = 1 if key[0] in quotes else len(key)
        return (
            f"holds a quote at character {position} of {len(key)}: the quotes around the key "
            "were taken as part of it (`docker run --env-file` keeps them, for one); "
            "remove them"
        )
    for position, char in enumerate(key, 1):
        if char in "\r\n":
            what = "a line break"
        elif char == "\0" or unicodedata.category(char) == "Cc":
            what = "a control character (such as NUL)"
        elif not char.isascii():
            what = "a non-ASCII character (a smart quote or non-breaking space from a paste?)"
        elif char.isspace():
            what = "a space"
        else:
            continue
        return (
            f"contains {what} at character {position} of {len(key)}; a Conversion Key is "
            "printable ASCII without spaces: copy it again, or put it alone on the "
            "CAPI_API_KEY= line of the config file"
        )
    return None
