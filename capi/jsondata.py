"""The first gate for what a caller hands the producer: plain JSON data, bounded in size and depth.

:func:`plain_copy` walks a value depth first and returns a copy made only of ``dict``
(string keys), ``list``, ``str``, ``int`` (64-bit), finite ``float``, ``bool`` and ``None``;
tuples become lists, ``str``/``int``/``dict`` subclasses become the plain types, and a
finite :class:`~decimal.Decimal` becomes its exact text (a money ``value``: :mod:`capi.money`).
It refuses, with :class:`~capi.errors.EventRejected` naming the path and the rule, anything
else: bytes, arbitrary objects, NaN and infinity, integers beyond 64 bits, text with lone
surrogates, nesting deeper than :data:`MAX_DEPTH` (which also stops cycles), and more data than the
byte budget (counted as a lower bound of the value's size as JSON). The walk stops at the
first problem and never spends more than the budget, so its time and memory are bounded
whatever the input (a cycle, a shared list repeated a million times, 80,000 emails).

A dict is walked first by a quick walk that knows only the plain types themselves (most
events are nothing else); at anything else, or a bound reached, it gives up and the careful
walk starts again, copying subclasses and naming the problem. Each walk is bounded by the
budget, so the two together cost at most twice the budget.

:data:`MAX_DEPTH` is chosen so that every accepted event also fits, with room to spare, in a
dead letter record and every JSON parser on its way (pydantic's JSON parser stops near 200
levels, orjson near 254).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from capi.errors import EventRejected, Problem

MAX_DEPTH = 32
"""Deepest nesting of an event, counting the event object itself as level 1."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_NODE_BYTES = 2  # the least JSON any value takes with its separator: "1," or "[]"
_JSON_ONLY = "must be JSON data (text, number, true/false, null, list or object)"


class _Budget:
    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.max_bytes = max_bytes

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            kib = self.max_bytes // 1024
            raise EventRejected(
                [Problem("(event)", f"is more than {kib} KiB as JSON; at most {kib} KiB per event")]
            )


def plain_copy(value: Any, *, max_bytes: int) -> Any:
    """A plain-JSON copy of ``value``; raise EventRejected at the first thing that is not."""
    if type(value) is dict:
        try:
            return _PlainWalk(max_bytes).mapping(value, 1)
        except _Unusual:
            pass  # the careful walk below names the problem, or copies what is unusual
    return _copy(value, None, 1, _Budget(max_bytes))


class _Unusual(Exception):
    """Raised by the quick walk at anything but plain data well within every bound."""


class _PlainWalk:
    """The quick walk: the same copy as :func:`_copy` for values made only of the plain
    types themselves, with the same depth limit and the same budget spent in the same
    amounts. It never refuses: at the first thing it does not expect (a subclass, a tuple,
    a bound passed, text that is not UTF-8) it gives up and :func:`_copy` walks again.
    Like :func:`_copy`, it spends the budget before reading any text or entering any value,
    so giving up costs at most the budget, and the time bound holds."""

    __slots__ = ("left",)

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes - _NODE_BYTES  # the event object itself

    def mapping(self, value: dict[Any, Any], depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise _Unusual
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Unusual
            kind = type(item)
            # Most entries hold text or an integer: key, node and text are spent together.
            if kind is str:
                self.left -= len(key) + len(item) + 4 + _NODE_BYTES
                if self.left < 0:
                    raise _Unusual
                if not (key.isascii() and item.isascii()):
                    _utf8(key)
                    _utf8(item)
                out[key] = item
            elif kind is int and INT_MIN <= item <= INT_MAX:
                self.left -= len(key) + 2 + _NODE_BYTES
                if self.left < 0:
                    raise _Unusual
                if not key.isascii():
                    _utf8(key)
                out[key] = item
            else:
                self.text(key)
                out[key] = self.item(item, depth + 1)
        return out

    def item(self, value: Any, depth: int) -> Any:
        self.left -= _NODE_BYTES
        if self.left < 0:
            raise _Unusual
        kind = type(value)
        if kind is str:
            return self.text(value)
        if kind is int:
            if not INT_MIN <= value <= INT_MAX:
                raise _Unusual
            return value
        if value is None or kind is bool:
            return value
        if kind is dict:
            return self.mapping(value, depth)
        if kind is list:
            if depth > MAX_DEPTH:
                raise _Unusual
            return [self.item(v, depth + 1) for v in value]
        if kind is float and math.isfinite(value):
            return value
        raise _Unusual

    def text(self, value: str) -> str:
        self.left -= len(value) + 2
        if self.left < 0:
            raise _Unusual
        if not value.isascii():
            _utf8(value)
        return value


def _utf8(value: str) -> None:
    """Raise _Unusual if value cannot be UTF-8 (it holds a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Unusual from None


# A path is built only for a refusal: (parent, key or index) links, None at the event.
Path = tuple[Any, str | int] | None


def _copy(value: Any, path: Path, depth: int, budget: _Budget) -> Any:
    budget.spend(_NODE_BYTES)
    kind = type(value)
    if kind is str:
        return _text(value, path, budget)
    if value is None or kind is bool:
        return value
    if kind is dict or kind is list or isinstance(value, Mapping | list | tuple):
        if depth > MAX_DEPTH:
            raise _refused(path, f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, Mapping):
            return _mapping(value, path, depth, budget)
        return [_copy(item, (path, i), depth + 1, budget) for i, item in enumerate(value)]
    # Subclasses become the plain type through the base class's own method, never theirs.
    if isinstance(value, str):
        return _text(str.__str__(value), path, budget)
    if isinstance(value, int):
        number = int.__int__(value)
        if not INT_MIN <= number <= INT_MAX:
            raise _refused(path, "is beyond the 64-bit integer range")
        return number
    if isinstance(value, float):
        real = float.__float__(value)
        if not math.isfinite(real):
            raise _refused(path, "must be a finite number (not NaN or infinity)")
        return real
    if isinstance(value, Decimal) and value.is_finite():
        return _text(format(value, "f"), path, budget)  # exact text: a money value (capi.money)
    raise _refused(path, f"{_JSON_ONLY}, got {_type(value)}")


def _mapping(value: Mapping[Any, Any], path: Path, depth: int, budget: _Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _refused(path, f"has a key that is not a string ({_type(key)})")
        name = _text(str.__str__(key), path, budget)
        out[name] = _copy(item, (path, name), depth + 1, budget)
    return out


def _text(value: str, path: Path, budget: _Budget) -> str:
    budget.spend(len(value) + 2)  # its quotes; a character is at least one UTF-8 byte
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _refused(path, "must be valid Unicode text (it holds a lone surrogate)") from None
    return value


def _refused(path: Path, rule: str) -> EventRejected:
    return EventRejected([Problem(_shown(path), rule)])


def _shown(path: Path) -> str:
    parts: list[str | int] = []
    while path is not None:
        path, part = path
        parts.append(part)
    out = ""
    for part in reversed(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part[:40]}" if out else part[:40]
    return out or "(event)"


def _type(value: Any) -> str:
    return type(value).__name__[:40]
