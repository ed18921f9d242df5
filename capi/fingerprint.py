"""Identify a Conversion Key without revealing it, and guess its type from its shape.

A fingerprint is the key's last four characters plus a short SHA-256 prefix, e.g.
``…x9Qa (sha256:1f2e3d4c)``: enough to tell two keys apart in logs, dead letters and
support tickets, never enough to use.
"""

from __future__ import annotations

import hashlib

# No key prefix is documented. These shapes only sharpen guidance; none rejects a key.
_SHAPE_HINTS: tuple[tuple[str, str], ...] = (
    ("sk-proj-", "an OpenAI platform project key (platform settings), not a Conversion Key"),
    ("sk-admin-", "an OpenAI platform admin key (platform settings), not a Conversion Key"),
    ("sk-None-", "an OpenAI platform user key, not a Conversion Key"),
    ("sk-svcacct-", "shaped like a service-account key, the shape guides give Conversion Keys"),
)


def fingerprint(key: str) -> str:
    """Return a short, non-reversible identifier for a key."""
    if not key:
        return "(no key)"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    tail = key[-4:] if len(key) >= 12 else ""
    return f"…{tail} (sha256:{digest})" if tail else f"(sha256:{digest})"


def shape_hint(key: str) -> str | None:
    """Describe what a key's prefix suggests it is, or None when the shape says nothing."""
    for prefix, hint in _SHAPE_HINTS:
        if key.startswith(prefix):
            return hint
    if key.startswith("sk-") and not key.startswith("sk-svcacct-"):
        return "shaped like an OpenAI platform key, not like the keys guides show for Conversions"
    return None


def redact(text: str, key: str) -> str:
    """Replace every occurrence of the key in text by its fingerprint."""
    if key and key in text:
        return text.replace(key, f"<key {fingerprint(key)}>")
    return text
