"""The quick path of :func:`capi.events.prepare`: a plain, valid event checked by hand.

Most events are small, plain and valid: a standard type, a user with an email or two, a
price, a page URL. For them, validation is a few type checks and set lookups, and the
pydantic models of :mod:`capi.schema` need not be built at all. :func:`sent` checks such an
event field by field with the schema's own rules and returns it as it will be sent: a new
dict in the schema's field order, raw identifiers hashed (:mod:`capi.hashing`), lists
deduplicated and cut as :mod:`capi.identifiers` does, ``value`` turned into ``amount``
(:mod:`capi.money`), codes uppercased, the source URL as sent (:mod:`capi.sourceurl`).

It never refuses and never warns. At anything else it returns None and prepare() takes
the careful path (the plain-JSON copy, the pydantic models, every rule named), which
decides exactly as it always has: a type that is not one of the plain types itself, an
explicit ``null``, a field the quick path does not know (a custom event, a legacy name),
an invalid or unusual value (one that would be dropped with a warning, or refused), an
event near the size bound. ``tests/test_prepare_quick.py`` holds it to the careful path's
output, byte for byte, over generated and mutated events.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any, get_args

import orjson

from capi import schema
from capi.constants import MAX_EVENT_BYTES
from capi.hashing import HASHERS, Identifier, check_hashed
from capi.identifiers import MAX_VALUES
from capi.jsondata import INT_MAX, INT_MIN
from capi.money import minor_units
from capi.sourceurl import sent_url


class _Unusual(ValueError):
    """Raised at anything the quick path leaves to the careful one."""


Check = Callable[[Any], Any]

# The careful walk counts at most twice an event's JSON size against MAX_EVENT_BYTES (each
# node at most 2 bytes for its 1 or more): an event of at most half of it is within bounds.
_MAX_INPUT_JSON = MAX_EVENT_BYTES // 2
_MAX_ITEMS = 64  # a longer list (80,000 emails, a list shared a million times) is not quick
_SOURCES = frozenset(get_args(schema.ActionSource))
_DATA_TYPES = schema.STANDARD_TYPES  # a custom event is the careful path's
_APP_TYPES = schema.APP_EVENT_TYPES
_EVENT_KEYS = frozenset(
    {"id", "type", "timestamp_ms", "oppref", "source_url", "action_source", "user"}
    | {"opt_out", "data", "consent"}
)
_DATA_KEYS = {
    "customer_action": frozenset({"type", "amount", "currency", "value"}),
    "contents": frozenset({"type", "amount", "currency", "value", "contents"}),
    "plan_enrollment": frozenset({"type", "amount", "currency", "value", "plan_id", "contents"}),
}
_ITEM_KEYS = frozenset(schema.Item.model_fields) | {"value"}
_HASHERS = {kind.value: (HASHERS[kind], kind.hashed_field) for kind in Identifier}


def sent(raw: dict[str, Any], hash_identifiers: bool) -> dict[str, Any] | None:
    """The event as it will be sent, or None when the careful path must decide. The input
    is only read; its ``consent`` (capi's, never sent) is left to the caller."""
    try:
        # The walk reads only its own shape, each list of at most _MAX_ITEMS: bounded by
        # the input's size, which orjson can then count without blowing up a shared list.
        sent = _event(raw, hash_identifiers)
        if len(orjson.dumps(raw)) > _MAX_INPUT_JSON:  # raises at lone surrogates, odd types
            return None
    except (ValueError, TypeError):  # _Unusual, a rule broken, or orjson's refusal
        return None
    return sent


def _event(raw: dict[str, Any], hash_identifiers: bool) -> dict[str, Any]:
    if not _EVENT_KEYS.issuperset(raw):
        raise _Unusual
    event_id, event_type, timestamp_ms = raw.get("id"), raw.get("type"), raw.get("timestamp_ms")
    if type(event_type) is not str or event_type not in _DATA_TYPES:
        raise _Unusual  # a custom event, too: its name and data have rules of their own
    data_type = _DATA_TYPES[event_type]
    if type(timestamp_ms) is not int or not INT_MIN <= timestamp_ms <= INT_MAX:
        raise _Unusual
    if type(event_id) is not str:
        raise _Unusual
    out = {"id": schema.event_id(event_id), "type": event_type, "timestamp_ms": timestamp_ms}
    if "oppref" in raw:
        out["oppref"] = _non_empty(raw["oppref"])
    _source(raw, event_type, out)
    if "user" in raw:
        out["user"] = _user(raw["user"], hash_identifiers)
    if "opt_out" in raw:
        if type(raw["opt_out"]) is not bool:
            raise _Unusual
        out["opt_out"] = raw["opt_out"]
    out["data"] = _data(raw.get("data"), data_type)
    return out


def _non_empty(value: Any) -> str:
    if type(value) is not str or not value:
        raise _Unusual
    return value


def _source(raw: dict[str, Any], event_type: str, out: dict[str, Any]) -> None:
    """``source_url`` as sent (with the click id of its query) and ``action_source``."""
    action_source = raw.get("action_source")
    if "action_source" in raw and (type(action_source) is not str or action_source not in _SOURCES):
        raise _Unusual  # an explicit null, too: the quick path leaves every null alone
    if event_type in _APP_TYPES and action_source != "mobile_app":
        raise _Unusual
    if "source_url" in raw:
        url = raw["source_url"]
        if type(url) is not str:
            raise _Unusual
        url, oppref = sent_url(url)
        if url is None:
            raise _Unusual
        if oppref and "oppref" not in out:
            out["oppref"] = oppref
        out["source_url"] = url
    elif action_source == "web":
        raise _Unusual
    if action_source is not None:
        out["action_source"] = action_source


def _data(raw: Any, data_type: str) -> dict[str, Any]:
    if type(raw) is not dict or raw.get("type") != data_type:
        raise _Unusual
    if not _DATA_KEYS[data_type].issuperset(raw):
        raise _Unusual
    out = _priced(raw, raw.get("currency"))
    currency = out.get("currency")
    if currency is None and "amount" in out:
        raise _Unusual
    out["type"] = data_type
    if "plan_id" in raw:
        out["plan_id"] = _non_empty(raw["plan_id"])
    if "contents" in raw:
        items = raw["contents"]
        if type(items) is not list or len(items) > _MAX_ITEMS:
            raise _Unusual
        out["contents"] = [*map(_item, items, repeat(currency, len(items)))]
    return out


def _priced(raw: dict[str, Any], currency: Any) -> dict[str, Any]:
    """``amount`` (given, or from ``value`` in ``currency``) and ``currency`` of ``raw``."""
    if "value" in raw:
        if "amount" in raw or type(currency) is not str:
            raise _Unusual
        value = raw["value"]
        if type(value) is not str and (type(value) is not int or not INT_MIN <= value <= INT_MAX):
            raise _Unusual
        amount = minor_units(value, _currency(currency))
    elif "amount" in raw:
        amount = raw["amount"]
    else:
        return {"currency": _currency(raw["currency"])} if "currency" in raw else {}
    if type(amount) is not int or not 0 <= amount <= INT_MAX:
        raise _Unusual  # a null, too: the quick path leaves every null alone
    if "currency" in raw:
        return {"amount": amount, "currency": _currency(raw["currency"])}
    return {"amount": amount}


def _currency(value: Any) -> str:
    if type(value) is not str:
        raise _Unusual
    code = value.upper()
    if code not in schema.currency_codes():  # schema.currency()'s rule, without its words
        raise _Unusual
    return code


def _item(raw: Any, data_currency: str | None) -> dict[str, Any]:
    if type(raw) is not dict or not _ITEM_KEYS.issuperset(raw):
        raise _Unusual
    out = _priced(raw, raw.get("currency", data_currency))
    if "amount" in out and "currency" not in out and data_currency is None:
        raise _Unusual
    for name in ("id", "group_id", "name", "content_type"):
        if name in raw:
            out[name] = _non_empty(raw[name])
    if "quantity" in raw:
        quantity = raw["quantity"]
        if type(quantity) is not int or not 0 <= quantity <= INT_MAX:
            raise _Unusual
        out["quantity"] = quantity
    if "variant_dict" in raw:
        variants = raw["variant_dict"]
        if (
            type(variants) is not dict
            or len(variants) > _MAX_ITEMS
            or not all(type(k) is str and type(v) is str for k, v in variants.items())
        ):
            raise _Unusual
        out["variant_dict"] = dict(variants)
    return out


def _user(raw: Any, hash_identifiers: bool) -> dict[str, Any]:
    """The user as sent: raw identifiers hashed after the given hashes, each list without
    repeats and cut to its first :data:`MAX_VALUES`, every value valid."""
    if type(raw) is not dict:
        raise _Unusual
    out: dict[str, Any] = {}
    hashed: dict[str, list[str]] = {}  # apart: a given hashed field is checked alone first
    for name, value in raw.items():
        field = _USER_FIELDS.get(name)
        if field is not None:
            check, many = field
            out[name] = _many(value, check) if many else check(value)
        elif hash_identifiers and name in _HASHERS:
            hashed_field, hashes = _hashed(raw, name)
            hashed[hashed_field] = hashes
        else:
            raise _Unusual  # a legacy name or an unknown field: a refusal
    if out:
        out.update(hashed)
    else:
        out = hashed  # the usual case: raw identifiers only
    if len(out) > 1:
        out = {name: out[name] for name in sorted(out, key=_USER_ORDER.__getitem__)}
    return out


def _hashed(raw: dict[str, Any], name: str) -> tuple[str, list[str]]:
    """The hashed field of the raw identifier ``name`` and its values: the given ones, then
    the hashes of the raw ones."""
    hasher, hashed_field = _HASHERS[name]
    values = raw[name]
    if hashed_field in raw:
        given = raw[hashed_field]
        if type(given) is not list or len(given) > _MAX_ITEMS:
            raise _Unusual
    elif type(values) is str:
        return hashed_field, [hasher(values)]  # the usual case: one value, nothing given
    else:
        given = []
    if type(values) is str:
        values = [values]
    elif type(values) is not list or not values or len(values) > _MAX_ITEMS:
        raise _Unusual
    hashes = [hasher(value) for value in values]
    if given:
        return hashed_field, _many([*given, *hashes], _HASHED)
    if len(hashes) > 1:
        hashes = list(dict.fromkeys(hashes))  # lowercase hex: repeats are equal already
    return hashed_field, hashes[:MAX_VALUES]


def _many(values: Any, check: Check) -> list[Any]:
    """A list field's values checked, without repeats, cut to :data:`MAX_VALUES`."""
    if type(values) is not list or len(values) > _MAX_ITEMS:
        raise _Unusual
    checked = [check(v) for v in (_unique(values) if len(values) > 1 else values)]
    return checked[:MAX_VALUES] if len(checked) > MAX_VALUES else checked


def _unique(values: list[Any]) -> list[Any]:
    """``values`` without repeats, compared trimmed and lowercased, order kept (as
    :func:`capi.identifiers.dedupe`)."""
    seen = set()
    kept = []
    for v in values:
        if type(v) is not str:
            raise _Unusual
        key = v.strip().lower()
        if key not in seen:
            seen.add(key)
            kept.append(v)
    return kept


def _text(check: Callable[[str], str]) -> Check:
    """``check`` of a value that must be text (strict: never a subclass)."""

    def checked(value: Any) -> str:
        if type(value) is not str or not value:
            raise _Unusual  # min_length=1 in the schema, or not text
        return check(value)

    return checked


_HASHED = _text(check_hashed)
_USER_FIELDS: dict[str, tuple[Check, bool]] = {
    "emails_sha256": (_HASHED, True),
    "phone_numbers_sha256": (_HASHED, True),
    "external_ids_sha256": (_HASHED, True),
    "first_names_sha256": (_HASHED, True),
    "last_names_sha256": (_HASHED, True),
    "regions": (_text(schema.place), True),
    "postal_codes": (_text(schema.postal_code), True),
    "cities": (_text(schema.place), True),
    "countries": (_text(schema.country), True),
    "ip_address": (_text(schema.ip), False),
    "user_agent": (_text(schema.non_blank), False),
    "obref": (_text(schema.non_blank), False),
    "android_advertising_id": (_text(schema.gaid), False),
}
"""Each field of the API's user object: its value's check, and whether it is a list."""
_USER_ORDER = {name: i for i, name in enumerate(schema.User.model_fields)}
