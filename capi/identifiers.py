"""A user's identifiers: raw ones hashed, invalid ones dropped, each list kept to three.

The API uses "the first three valid unique values" of each user list and never rejects an
event over an identifier it cannot use; so capi does not either. An invalid *optional*
identifier (a raw email, phone, name or external id, a hash, a region, postal code, city,
country, the IP address, user agent, ``obref`` or AAID, and the event's ``oppref`` click
id: an empty one is what a missing ``__oppref`` cookie often gives) is dropped from the
event and reported as a warning (:class:`~capi.errors.Problem`: field and rule), unless strict mode
(``CAPI_STRICT_IDENTIFIERS=true``) asks for the old refusal. Unknown user fields and the
pre-September singular names stay refusals: they are mistakes in code, not in data.

The functions here work on the event's own plain-data copy (see :func:`capi.events.prepare`),
in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from capi import schema
from capi.errors import Problem
from capi.hashing import Identifier, hash_identifier

MAX_VALUES = 3
"""The API uses at most this many values of each user list."""

LEGACY_USER_FIELDS = {
    "email_sha256": "emails_sha256",
    "external_id_sha256": "external_ids_sha256",
    "phone_number_sha256": "phone_numbers_sha256",
    "country": "countries",
    "city": "cities",
    "zip_code": "postal_codes",
    "emails": "email",
    "phones": "phone",
}

# Each raw identifier with its field names, looked up once rather than per event.
_IDENTIFIERS = tuple((kind, kind.value, kind.hashed_field) for kind in Identifier)
_RAW_FIELDS = frozenset(raw for _, raw, _ in _IDENTIFIERS)
# The fields of the API's user object: any value of them may be dropped when invalid.
_DROPPABLE = frozenset(schema.User.model_fields)
# The event's own optional identifiers (outside ``user``), dropped alike when invalid.
EVENT_IDENTIFIERS = frozenset({"oppref"})
_LISTS = frozenset(
    name for name, f in schema.User.model_fields.items() if "list" in str(f.annotation)
)


def hash_raw(user: dict[str, Any], problems: list[Problem], warnings: list[Problem]) -> None:
    """Replace raw identifiers in ``user`` by their hashes, in place.

    A legacy field name is a problem (the event is refused); a raw value that cannot be
    normalized is a warning, and only that value is left out; so is a hashed field given
    beside raw values that is not a list (the raw values' hashes are kept).
    """
    if not user.keys().isdisjoint(LEGACY_USER_FIELDS):
        for legacy, plural in LEGACY_USER_FIELDS.items():
            if legacy in user:
                user.pop(legacy)
                problems.append(Problem(f"user.{legacy}", f"is not a field; use user.{plural}"))
    if user.keys().isdisjoint(_RAW_FIELDS):
        return
    for kind, raw_field, hashed_field in _IDENTIFIERS:
        if raw_field not in user:
            continue
        values = user.pop(raw_field)
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not values:
            warnings.append(
                Problem(f"user.{raw_field}", "must be a string or a non-empty list of strings")
            )
            continue
        given = user.get(hashed_field)
        if given is not None and not isinstance(given, list):
            # The bad value goes, not the raw ones beside it (the schema would drop the
            # whole field, their hashes with it).
            warnings.append(
                Problem(f"user.{hashed_field}", "must be a list of SHA-256 hex digests")
            )
            del user[hashed_field]
            given = None
        hashed: list[Any] = list(given) if given else []
        for i, value in enumerate(values):
            try:
                hashed.append(hash_identifier(kind, value))
            except ValueError as exc:
                warnings.append(Problem(f"user.{raw_field}[{i}]", str(exc)))
        if hashed:
            user[hashed_field] = hashed


def dedupe(user: dict[str, Any]) -> bool:
    """Drop repeated values from each list in ``user`` (compared trimmed and lowercased:
    hashes, country codes and places are case-blind), order kept; True when a list still
    holds more than :data:`MAX_VALUES` (to cut once the invalid ones are gone)."""
    long = False
    for name, values in user.items():
        if type(values) is not list or len(values) < 2:
            continue  # the usual single value
        seen: set[Any] = set()
        kept = []
        for v in values:
            key = v.strip().lower() if isinstance(v, str) else id(v)
            if key not in seen:
                seen.add(key)
                kept.append(v)
        if len(kept) != len(values):
            user[name] = kept
        long = long or len(kept) > MAX_VALUES
    return long


def droppable(errors: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every validation error is an invalid value of an optional identifier: a user
    field, or one of :data:`EVENT_IDENTIFIERS`."""
    for err in errors:
        loc = err["loc"]
        if len(loc) == 1 and loc[0] in EVENT_IDENTIFIERS:
            continue
        if len(loc) < 2 or loc[0] != "user" or loc[1] not in _DROPPABLE:
            return False
        if err["type"] == "extra_forbidden":
            return False
    return True


def drop(event: dict[str, Any], locs: Iterable[tuple[Any, ...]]) -> None:
    """Remove the values at ``locs`` (pydantic locations, as :func:`droppable` allows) from
    ``event``; a user list left empty, and a bad scalar, leave the field out altogether."""
    user = event.get("user")
    whole: set[str] = set()
    items: dict[str, set[int]] = {}
    for loc in locs:
        if len(loc) == 1:
            event.pop(str(loc[0]), None)  # one of EVENT_IDENTIFIERS
        elif not isinstance(user, dict):
            continue
        elif len(loc) > 2 and isinstance(loc[2], int):
            items.setdefault(str(loc[1]), set()).add(loc[2])
        else:
            whole.add(str(loc[1]))
    if not isinstance(user, dict):
        return
    for name in whole:
        user.pop(name, None)
    for name, indices in items.items():
        values = user.get(name)
        if name in whole or not isinstance(values, list):
            continue
        kept = [v for i, v in enumerate(values) if i not in indices]
        if kept:
            user[name] = kept
        else:
            user.pop(name)


def cut(user: schema.User) -> None:
    """Keep the first :data:`MAX_VALUES` of each list of a validated user."""
    for name in _LISTS:
        values = getattr(user, name)
        if values is not None and len(values) > MAX_VALUES:
            setattr(user, name, values[:MAX_VALUES])
