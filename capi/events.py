"""Turn what a backend hands us into an event ready to queue, or refuse it precisely.

:func:`prepare` is the single gate. A plain, valid event takes the quick path
(:mod:`capi.quick`); any other is copied as plain JSON data, bounded in size and depth
(:mod:`capi.jsondata`). Either way it hashes raw identifiers (``user.email`` and friends),
validates the event against :mod:`capi.schema`, applies the cross-field rules and the API's
time window against an injectable clock, and returns a :class:`PreparedEvent` whose JSON is
exactly what will be sent. Anything wrong raises :class:`~capi.errors.EventRejected`,
naming each field path and the rule it breaks.

:func:`signup` and :func:`purchase` build the two events capi exists for.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

import orjson
from pydantic import ValidationError

from capi import coverage, identifiers, money, quick, schema
from capi.clock import Clock, now_ms
from capi.constants import API_MAX_AGE_MS, API_MAX_FUTURE_MS, MAX_EVENT_BYTES
from capi.errors import EventRejected, Problem
from capi.hashing import Identifier
from capi.jsondata import plain_copy
from capi.sourceurl import sent_url

"""Returns the current Unix time in seconds (``time.time`` unless a test injects one)."""

_CUSTOM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62}[A-Za-z0-9])?")
MAX_PROBLEMS = 20
CONSENT_VALUES = ("granted", "denied")
_MONEY_HINT = "an integer in the currency's minor unit (12999 for 129.99 USD, 8900 for ¥8900)"


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """A validated event with identifiers hashed, and its JSON as it will be sent; with
    the optional identifiers left out as invalid (``warnings``) and the event's consent.

    ``data`` is the validated model, or, from the quick path (:mod:`capi.quick`), which
    checks an event without building one, the event as sent as plain data: :attr:`event`
    builds the model from it when first asked for."""

    json: bytes
    data: schema.Event | dict[str, Any] = field(repr=False, compare=False)
    warnings: tuple[Problem, ...] = ()
    consent: str | None = None

    @property
    def event(self) -> schema.Event:
        """The event as a validated model (validating the plain data again gives the same
        model: every rule holds, and every normalization gives back what it is given)."""
        data = self.data
        if isinstance(data, dict):
            model: schema.Event = _validate_event(data)
            object.__setattr__(self, "data", model)  # a cache: frozen for everything else
            return model
        return data

    @property
    def id(self) -> str:
        """The event id, the API's dedup key together with the pixel and name."""
        data = self.data
        return data["id"] if type(data) is dict else self.event.id

    @property
    def name(self) -> str:
        """The event name the API dedups on (the quick path takes no custom event: its
        type)."""
        data = self.data
        return data["type"] if type(data) is dict else self.event.name

    @property
    def timestamp_ms(self) -> int:
        """When the conversion happened, Unix milliseconds."""
        data = self.data
        return data["timestamp_ms"] if type(data) is dict else self.event.timestamp_ms

    @property
    def mask(self) -> int:
        """The identifier signals the event carries as sent (:func:`capi.coverage.mask`)."""
        data = self.data
        return coverage.mask_of_sent(data) if type(data) is dict else coverage.mask(self.event)

    def opted_out(self) -> PreparedEvent:
        """This event as sent when consent is denied under the ``opt_out`` policy: with
        ``opt_out: true`` and without ``obref`` (the Pixel's browser id)."""
        user = self.event.user
        if user is not None and user.obref is not None:
            user = user.model_copy(update={"obref": None})
        event = self.event.model_copy(update={"opt_out": True, "user": user})
        return PreparedEvent(event.to_json(), event, self.warnings, self.consent)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Input that is no JSON value at all (an NDJSON line of the intake or of ``capi
    enqueue`` that does not parse): :func:`prepare` refuses it with ``rule``, which says
    why, at ``path``, so the refusal (and the live-outcomes ring) names the line rather
    than a stand-in. ``kept`` is the rule as the ring keeps it when ``rule`` quotes the
    input (a key named twice: the client's, which may be an email address used as a key)."""

    rule: str
    path: str = "(event)"
    kept: str | None = None


def prepare(
    raw: Mapping[str, Any] | schema.Event | Unreadable,
    *,
    clock: Clock = time.time,
    hash_identifiers: bool = True,
    check_time: bool = True,
    strict_identifiers: bool = False,
) -> PreparedEvent:
    """Hash, validate and serialize one event; raise EventRejected naming every problem.

    A plain, valid event is checked by the quick path (:mod:`capi.quick`); any other is
    first copied as plain JSON data of bounded size and depth
    (:func:`capi.jsondata.plain_copy`) and decided by the careful path, which names every
    problem. Both decide alike; the input is never changed. An invalid optional
    identifier is left out and named in :attr:`PreparedEvent.warnings`
    (:mod:`capi.identifiers`), or refuses the event with ``strict_identifiers``.
    ``hash_identifiers=False`` treats raw identifier fields as unknown (the API's view);
    ``check_time=False`` leaves the time window to the caller.
    """
    now = None  # the clock is read once, when the time window is checked
    if type(raw) is dict and ("consent" not in raw or _plain_consent(raw)):
        sent = quick.sent(raw, hash_identifiers)
        if sent is not None:
            now = now_ms(clock) if check_time else None
            if now is None or not time_window_problems(sent["timestamp_ms"], now):
                data_json = orjson.dumps(sent)
                if len(data_json) <= MAX_EVENT_BYTES:
                    return _quick_prepared(data_json, sent, raw.get("consent"))
    return _careful(raw, now, clock, hash_identifiers, check_time, strict_identifiers)


def _plain_consent(raw: dict[str, Any]) -> bool:
    """Whether the event's consent is one of :data:`CONSENT_VALUES`."""
    consent = raw["consent"]
    return type(consent) is str and consent in CONSENT_VALUES


# A frozen dataclass's own __init__ sets each field through object.__setattr__, which costs
# the quick path more than its JSON does; the slots' descriptors set them in half the time.
_SET_JSON, _SET_DATA, _SET_WARNINGS, _SET_CONSENT = (
    PreparedEvent.__dict__[f.name].__set__ for f in fields(PreparedEvent)
)


def _quick_prepared(data_json: bytes, sent: dict[str, Any], consent: str | None) -> PreparedEvent:
    """PreparedEvent(data_json, sent, (), consent), built in half the time."""
    prepared = object.__new__(PreparedEvent)
    _SET_JSON(prepared, data_json)
    _SET_DATA(prepared, sent)
    _SET_WARNINGS(prepared, ())
    _SET_CONSENT(prepared, consent)
    return prepared


def _careful(
    raw: Mapping[str, Any] | schema.Event | Unreadable,
    now: int | None,
    clock: Clock,
    hash_identifiers: bool,
    check_time: bool,
    strict_identifiers: bool,
) -> PreparedEvent:
    """prepare() for any input: naming every problem (the clock is read once, when the
    time window is checked, unless the quick path read it as ``now``)."""
    if type(raw) is dict:
        pass  # the usual case, checked first: neither isinstance() below is free
    elif isinstance(raw, schema.Event):
        raw = raw.model_dump(mode="json", exclude_none=True)
    elif isinstance(raw, Unreadable):
        raise EventRejected([Problem(raw.path, raw.rule)])
    elif not isinstance(raw, Mapping):
        raise EventRejected([Problem("(event)", f"must be a JSON object, got {_kind(raw)}")])
    try:
        data: dict[str, Any] = plain_copy(raw, max_bytes=MAX_EVENT_BYTES)
    except EventRejected as exc:
        given = raw.get("id") if isinstance(raw, dict) else None
        raise EventRejected(exc.problems, given if isinstance(given, str) else None) from None
    event_id = data.get("id") if isinstance(data.get("id"), str) else None
    problems: list[Problem] = []
    warnings: list[Problem] = []
    consent = _consent(data, problems) if "consent" in data else None
    if type(data.get("data")) is dict:
        money.apply_values(data["data"], problems)
    try:
        event = _validated(data, event_id, problems, warnings, hash_identifiers, strict_identifiers)
    except EventRejected as exc:
        if check_time and now is None:
            now = now_ms(clock)
        if len(exc.problems) > MAX_PROBLEMS:  # capped already: its last one counts the rest
            raise EventRejected(exc.problems, event_id) from None
        more = _unvalidated_problems(data, exc.problems, now if check_time else None)
        raise EventRejected(_capped([*exc.problems, *more]), event_id) from None
    problems.extend(_cross_checks(event))
    if check_time:
        problems.extend(
            time_window_problems(event.timestamp_ms, now_ms(clock) if now is None else now)
        )
    if problems:
        raise EventRejected(_capped(problems), event_id)
    data_json = event.to_json()
    if len(data_json) > MAX_EVENT_BYTES:
        size = f"{len(data_json) // 1024} KiB"
        raise EventRejected(
            [Problem("(event)", f"is {size}; at most {MAX_EVENT_BYTES // 1024} KiB")], event_id
        )
    return PreparedEvent(data_json, event, tuple(_capped(warnings, "warnings")), consent)


def _validated(
    data: dict[str, Any],
    event_id: str | None,
    problems: list[Problem],
    warnings: list[Problem],
    hash_identifiers: bool,
    strict: bool,
) -> schema.Event:
    """The event validated; invalid optional identifiers left out as warnings (problems when
    ``strict``); EventRejected with every problem otherwise."""
    user = data.get("user")
    long = False
    if type(user) is dict:
        if hash_identifiers:
            identifiers.hash_raw(user, problems, problems if strict else warnings)
        long = identifiers.dedupe(user)
    try:
        event: schema.Event = _validate_event(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if strict or not identifiers.droppable(errors):
            problems.extend(_problems(errors, MAX_PROBLEMS - len(problems)))
            raise EventRejected(_capped(problems), event_id) from None
        warnings.extend(_problems(errors, MAX_PROBLEMS - len(warnings)))
        identifiers.drop(data, (err["loc"] for err in errors))
        try:
            event = _validate_event(data)  # only bad values were removed: valid now
        except ValidationError as again:
            more = again.errors(include_url=False)
            problems.extend(_problems(more, MAX_PROBLEMS - len(problems)))
            raise EventRejected(_capped(problems), event_id) from None
    if long and event.user is not None:
        identifiers.cut(event.user)
    return event


def _unvalidated_problems(
    data: dict[str, Any], found: Sequence[Problem], now: int | None
) -> list[Problem]:
    """Of the rules checked after validation, those that can be checked on an event the
    schema refused: the time window of an integer ``timestamp_ms`` (with ``now``) and the
    form of a string ``source_url``, so that fixing the problems named first does not only
    meet these next."""
    named = {p.path for p in found}
    more: list[Problem] = []
    stamp = data.get("timestamp_ms")
    if now is not None and type(stamp) is int and "timestamp_ms" not in named:
        more.extend(time_window_problems(stamp, now))
    url = data.get("source_url")
    if type(url) is str and "source_url" not in named and sent_url(url)[0] is None:
        more.append(Problem("source_url", "must be an absolute http(s) URL"))
    return more


def _consent(data: dict[str, Any], problems: list[Problem]) -> str | None:
    """The event's ``consent`` (taken out: it is capi's, never sent to the API)."""
    consent = data.pop("consent")
    if consent in CONSENT_VALUES:
        return str(consent)
    problems.append(Problem("consent", "must be 'granted' or 'denied'"))
    return None


# What Event.model_validate() calls, without its per-call Python wrapper.
_validate_event = schema.Event.__pydantic_validator__.validate_python


def _capped(problems: list[Problem], noun: str = "problems") -> list[Problem]:
    """The first MAX_PROBLEMS, then how many more there are (warnings too: an event with
    20,000 invalid emails was answered with as many, 1.7 MB)."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], Problem("(event)", f"and {more} more {noun}")]


def time_window_problems(timestamp_ms: int, now: int) -> list[Problem]:
    """The time-window rule: no older than 7 days, no more than 10 minutes ahead."""
    if timestamp_ms < 10**11:
        return [
            Problem("timestamp_ms", "must be Unix time in milliseconds; this looks like seconds")
        ]
    if timestamp_ms < now - API_MAX_AGE_MS:
        return [Problem("timestamp_ms", "is older than 7 days; the API refuses it (422)")]
    if timestamp_ms > now + API_MAX_FUTURE_MS:
        return [Problem("timestamp_ms", "is more than 10 minutes in the future")]
    return []


def _cross_checks(event: schema.Event) -> list[Problem]:
    problems: list[Problem] = []
    expected = schema.DATA_TYPE_OF[event.type]
    if event.data.type != expected:
        problems.append(
            Problem("data.type", f"must be {expected!r} for an event of type {event.type!r}")
        )
    problems.extend(_custom_name_problems(event))
    problems.extend(_source_problems(event))
    problems.extend(_money_problems("data", event.data))
    # vars(), not getattr(..., None): on a model without contents, pydantic's __getattr__
    # raises an AttributeError first, which costs more than the whole check.
    for i, item in enumerate(vars(event.data).get("contents") or []):
        if item.amount is not None and item.currency is None and event.data.currency is None:
            problems.append(
                Problem(
                    f"data.contents[{i}].currency",
                    "is required when amount is present and data.currency is not set",
                )
            )
    return problems


def _custom_name_problems(event: schema.Event) -> list[Problem]:
    name = event.custom_event_name
    if event.type != "custom":
        if name is not None:
            return [Problem("custom_event_name", "is only allowed when type is 'custom'")]
        return []
    if name is None:
        return [Problem("custom_event_name", "is required when type is 'custom'")]
    if not _CUSTOM_NAME.fullmatch(name):
        return [
            Problem(
                "custom_event_name",
                "must be 1-64 letters, digits, '_' or '-', starting and ending with a letter "
                "or digit",
            )
        ]
    if name.lower() in schema.DATA_TYPE_OF:
        return [Problem("custom_event_name", f"must not be a standard event name ({name!r})")]
    return []


def _source_problems(event: schema.Event) -> list[Problem]:
    problems: list[Problem] = []
    if event.type in schema.APP_EVENT_TYPES and event.action_source != "mobile_app":
        problems.append(
            Problem("action_source", f"must be 'mobile_app' for an event of type {event.type!r}")
        )
    if event.source_url is not None:
        sent, oppref = sent_url(event.source_url)
        if sent is None:
            problems.append(Problem("source_url", "must be an absolute http(s) URL"))
        elif sent != event.source_url:  # pydantic's __setattr__ is slow: only when it changes
            if oppref and event.oppref is None:  # the click id, before the query goes
                event.oppref = oppref
            event.source_url = sent
    elif event.action_source == "web":
        problems.append(Problem("source_url", "is required when action_source is 'web'"))
    return problems


def _money_problems(path: str, priced: schema._Priced) -> list[Problem]:
    if priced.amount is not None and priced.currency is None:
        return [Problem(f"{path}.currency", "is required when amount is present")]
    return []


# Stands for a problem past MAX_PROBLEMS, which _capped() only counts: each problem of an
# event with hundreds of unknown keys was given its rule, which cost more than the rest of
# its refusal (1,000 such events, 4 MB, cost the intake 3.7 s of CPU, 0.9 s now).
_UNSAID = Problem("(event)", "")


def _problems(errors: list[Any], shown: int | None = None) -> list[Problem]:
    """A Problem for each of a ValidationError's ``errors``; past the first ``shown``
    (when given), the :data:`_UNSAID` placeholder, which :func:`_capped` counts."""
    if shown is not None and len(errors) > max(shown, 0):
        cut = max(shown, 0)
        return [*_problems(errors[:cut]), *[_UNSAID] * (len(errors) - cut)]
    problems = []
    for err in errors:
        loc = list(err["loc"])
        data_type: str | None = None
        if len(loc) > 1 and loc[0] == "data" and loc[1] in schema.DATA_MODELS:
            data_type = str(loc.pop(1))
        path = _path(loc)
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            path += ".type"
        parent = _path(loc[:-1]) if err["type"] == "extra_forbidden" else None
        problems.append(Problem(path, _rule(err, loc, data_type), parent))
    return problems


@functools.cache
def _field_names() -> frozenset[str]:
    raw = {i.value for i in Identifier} | set(identifiers.LEGACY_USER_FIELDS)
    return schema.field_names() | raw | {"consent", "value"}


def kept_text(problem: Problem) -> str:
    """A problem as it may be kept (the live view's ring, in Redis): without a key name the
    client made up, which may be anything, an email address used as a key included."""
    return problem.without_client_names(_field_names())


def kept_name(value: str) -> str:
    """A refused event's type or custom event name as it may be kept (the live view's
    ring, in Redis): as given when a valid event could carry it (1-64 letters, digits, '_'
    or '-', as every type is), else ``?``: a column that slipped may have put anything
    there, an email address or a phone number included."""
    return value if _CUSTOM_NAME.fullmatch(value) else "?"


_KEY_LIMIT = 40


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        # Keys come from the input: a huge or odd one is cut, like any quoted value.
        name = str(part) if len(str(part)) <= _KEY_LIMIT else str(part)[:_KEY_LIMIT] + "…"
        out += f"[{part}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out or "(event)"


_SIMPLE_RULES = {
    "missing": "is required",
    "string_too_short": "must not be empty",
    "greater_than_equal": "must not be negative",
    "less_than_equal": "is beyond the 64-bit integer range",  # the only upper bound: 2**63-1
}


def _rule(err: Any, loc: list[Any], data_type: str | None) -> str:
    kind = err["type"]
    field = loc[-1] if loc else None
    if kind in _SIMPLE_RULES:
        return _SIMPLE_RULES[kind]
    if kind == "extra_forbidden":
        return _extra_rule(loc, data_type)
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return "is required and must be one of: " + ", ".join(schema.DATA_MODELS)
    if kind.startswith("int") and field in ("amount",):
        return f"must be {_MONEY_HINT}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {_kind(err.get('input'))}"
    if kind == "string_type":
        return f"must be a string, got {_kind(err.get('input'))}"
    if kind == "bool_type":
        return f"must be true or false, got {_kind(err.get('input'))}"
    if kind == "list_type":
        return f"must be a list, got {_kind(err.get('input'))}"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return "must be one of " + str(err["ctx"]["expected"]).replace("'", "")
    return str(err["msg"])


def _extra_rule(loc: list[Any], data_type: str | None) -> str:
    parent = [p for p in loc[:-1] if not isinstance(p, int)]
    if parent == ["data"] and data_type:
        model: type[Any] = schema.DATA_MODELS[data_type]
        allowed = schema.allowed_fields(model)
        return (
            f"is not a field of {data_type} data (the API answers 400 unknown_data_field); "
            f"allowed: {', '.join(allowed)}"
        )
    if parent[-2:] == ["data", "contents"]:
        return "is not an item field; allowed: " + ", ".join(schema.allowed_fields(schema.Item))
    if parent == ["user"]:
        allowed = [i.value for i in Identifier] + schema.allowed_fields(schema.User)
        return "is not a user field; allowed: " + ", ".join(allowed)
    if loc == ["events"]:  # the HTTP intake's envelope, given where an event goes
        return (
            'is not an event field: {"events": [...]} is the body of the HTTP intake (POST '
            "/v1/events); here give each event itself (capi enqueue: one JSON object per line)"
        )
    return "is not an event field; allowed: " + ", ".join(schema.allowed_fields(schema.Event))


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return names.get(type(value), type(value).__name__[:40])


def _user(**identifiers: Any) -> dict[str, Any]:
    return {k: v for k, v in identifiers.items() if v is not None}


def signup(
    event_id: str,
    *,
    timestamp_ms: int | None = None,
    email: str | list[str] | None = None,
    phone: str | list[str] | None = None,
    external_id: str | list[str] | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    source_url: str | None = None,
    action_source: str = "web",
    oppref: str | None = None,
    user: Mapping[str, Any] | None = None,
    clock: Clock = time.time,
) -> dict[str, Any]:
    """A signup: a ``registration_completed`` event with ``customer_action`` data."""
    return _event(
        event_id,
        "registration_completed",
        {"type": "customer_action"},
        timestamp_ms=timestamp_ms if timestamp_ms is not None else now_ms(clock),
        user={
            **(user or {}),
            **_user(
                email=email,
                phone=phone,
                external_id=external_id,
                first_name=first_name,
                last_name=last_name,
            ),
        },
        source_url=source_url,
        action_source=action_source,
        oppref=oppref,
    )


def purchase(
    event_id: str,
    *,
    amount: int | None = None,
    currency: str,
    value: str | Decimal | None = None,
    contents: list[Mapping[str, Any]] | None = None,
    timestamp_ms: int | None = None,
    email: str | list[str] | None = None,
    phone: str | list[str] | None = None,
    external_id: str | list[str] | None = None,
    source_url: str | None = None,
    action_source: str = "web",
    oppref: str | None = None,
    user: Mapping[str, Any] | None = None,
    clock: Clock = time.time,
) -> dict[str, Any]:
    """A purchase: an ``order_created`` event; ``amount`` in the currency's minor unit, or
    ``value`` as written (``"129.99"``: see :mod:`capi.money`)."""
    if (amount is None) == (value is None):
        raise TypeError("purchase() takes one of amount= (minor units) and value= (a decimal)")
    data: dict[str, Any] = {"type": "contents", "currency": currency}
    data.update({"amount": amount} if value is None else {"value": value})
    if contents is not None:
        data["contents"] = [dict(c) for c in contents]
    return _event(
        event_id,
        "order_created",
        data,
        timestamp_ms=timestamp_ms if timestamp_ms is not None else now_ms(clock),
        user={**(user or {}), **_user(email=email, phone=phone, external_id=external_id)},
        source_url=source_url,
        action_source=action_source,
        oppref=oppref,
    )


def _event(event_id: str, event_type: str, data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"id": event_id, "type": event_type, "data": data}
    event.update({k: v for k, v in fields.items() if v is not None and v != {}})
    return event
