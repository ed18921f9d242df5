"""What capi sends of the page an event happened on, and the click id its URL may carry.

The API wants an absolute http(s) ``source_url`` (trimmed, its path percent-encoded where a URL
cannot hold a character as it is); the query string, the fragment and any
``user:password@`` carry personal data and secrets, so :func:`sent_url` leaves them out,
taking the ``oppref`` click id from the query first (:func:`query_param`, as a browser reads
it). :mod:`capi.events` applies it to every event; :mod:`capi.web` reads the click id of a
landing page's query.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

_BAD_HOST = re.compile(r"[\s\x00-\x1f\x7f<>\"{}|\\^`%]")
# What a browser strips from both ends of a URL it is given (WHATWG: C0 controls and space).
_EDGES = "".join(map(chr, range(0x21)))
# A path's characters that RFC 3986 allows as they are ("%" keeps existing escapes); any
# other (a space, a quote, a non-ASCII letter) is percent-encoded as UTF-8, as browsers do.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


# Events come from a few pages. urlsplit() caches as many URLs itself, so this keeps no more.
@lru_cache(maxsize=128)
def sent_url(url: str) -> tuple[str | None, str | None]:
    """The URL as sent (None if it is not an absolute http(s) URL), and the ``oppref``
    of its query if it has one."""
    try:
        parts = urlsplit(url.strip(_EDGES))
    except ValueError:  # an unbalanced bracket in the host: "Invalid IPv6 URL"
        return None, None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None, None
    try:
        hostname, _ = parts.hostname, parts.port  # a port that is not a number: ValueError
    except ValueError:
        return None, None
    if not hostname or _BAD_HOST.search(hostname):
        return None, None  # https://:443/, a space or a control character in the host
    # Query strings, fragments and user:password@ carry PII and secrets: never send them.
    host = parts.netloc.rpartition("@")[2]
    path = quote(parts.path, safe=_PATH_SAFE)
    return urlunsplit((parts.scheme, host, path, "", "")), query_param(parts.query)


def query_param(query: str, name: str = "oppref") -> str | None:
    """The first value of ``name`` in a URL query as a browser's
    ``URLSearchParams.get(name)`` gives it (``+`` as space, percent-decoded as UTF-8,
    invalid sequences as U+FFFD), or None when absent."""
    if not query:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None
