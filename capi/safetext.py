"""Text from outside made safe to print on a terminal.

An endpoint's (or a proxy's) error text, a dead letter's fields, names and ids read from
files or Redis may hold terminal escapes (``ESC [ 2 J`` clears the screen; OSC sequences
retitle windows or forge links), other control characters, line breaks that forge whole
lines of output, and bidirectional overrides that show text in another order than it is.
:func:`shown` turns each such character into a visible escape (``\\x1b``, ``\\n``,
``\\u202e``) so that output shows what was received and does nothing else. Inside a JSON
string the ``\\uXXXX`` form reads back as the same character, so JSON stays equivalent.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text:
# bidi marks, embeddings, overrides and isolates; zero-width characters; line and
# paragraph separators; the byte order mark.
_INVISIBLE = "\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")
_UNSAFE_BUT_LINES = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_INVISIBLE}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: object, *, lines: bool = False) -> str:
    """``text`` (``str()`` of it) with every control, escape and bidi character made a
    visible escape; with ``lines``, line breaks (``\\n``) are kept (for text of several
    lines that capi composed around outside values)."""
    pattern = _UNSAFE_BUT_LINES if lines else _UNSAFE
    return pattern.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
