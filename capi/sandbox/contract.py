"""The sandbox's own reading of the event contract (capi-contract.md, sections 3-5).

Written from the contract, not from capi: this module imports nothing of capi's validation
(``capi.events``, ``capi.schema``, ``capi.hashing``), so a misreading there shows up as a
disagreement in the tests instead of being repeated here. :func:`check_event` judges one
event as the API receives it (identifiers already hashed) and returns every problem as an
:class:`Issue` with the API's ``param`` (relative to the event) and a ``code``.

Where the contract says nothing, the sandbox takes the strict reading and says so:
amounts and quantities are non-negative 64-bit integers; strings named non-empty must have
a non-blank character.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import pycountry

DATA_TYPES = {
    **dict.fromkeys(
        [
            "registration_completed",
            "lead_created",
            "appointment_scheduled",
            "app_installed",
            "app_opened",
        ],
        "customer_action",
    ),
    **dict.fromkeys(
        ["order_created", "checkout_started", "contents_viewed", "items_added", "page_viewed"],
        "contents",
    ),
    "subscription_created": "plan_enrollment",
    "trial_started": "plan_enrollment",
    "custom": "custom",
}
EVENT_KEYS = frozenset(
    [
        "id",
        "type",
        "timestamp_ms",
        "custom_event_name",
        "oppref",
        "source_url",
        "action_source",
        "user",
        "opt_out",
        "data",
    ]
)
ACTION_SOURCES = frozenset(
    ["web", "mobile_app", "offline", "physical_store", "phone_call", "email", "other"]
)
DATA_KEYS = {
    "customer_action": frozenset(["type", "amount", "currency"]),
    "contents": frozenset(["type", "amount", "currency", "contents"]),
    "plan_enrollment": frozenset(["type", "plan_id", "amount", "currency", "contents"]),
    "custom": None,  # any extra key
}
ITEM_KEYS = frozenset(
    ["id", "group_id", "name", "content_type", "quantity", "amount", "currency", "variant_dict"]
)
HASHED = ("emails", "phone_numbers", "external_ids", "first_names", "last_names")
USER_KEYS = frozenset(
    [f"{h}_sha256" for h in HASHED]
    + ["regions", "postal_codes", "cities", "countries"]
    + ["ip_address", "user_agent", "obref", "android_advertising_id"]
)
MAX_AGE_MS = 7 * 24 * 3600 * 1000
MAX_AHEAD_MS = 10 * 60 * 1000
_CUSTOM_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POSTAL = re.compile(r"[A-Za-z0-9 -]{1,32}")
_GAID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem with an event: where (relative to the event), a code, and a message."""

    param: str
    code: str
    message: str


@cache
def _currencies() -> frozenset[str]:
    return frozenset(c.alpha_3 for c in pycountry.currencies)


@cache
def _countries() -> frozenset[str]:
    return frozenset(c.alpha_2 for c in pycountry.countries)


def is_too_old(event: Any, now_ms: int) -> bool:
    """Whether the event's timestamp is older than 7 days (the API answers 422)."""
    ts = event.get("timestamp_ms") if isinstance(event, dict) else None
    return _is_int(ts) and ts < now_ms - MAX_AGE_MS


def check_event(event: Any, now_ms: int) -> list[Issue]:
    """Every problem of one event as sent (hashed identifiers), judged from the contract."""
    if not isinstance(event, dict):
        return [Issue("", "invalid_event", "event must be an object")]
    out: list[Issue] = []
    for key in event.keys() - EVENT_KEYS:
        out.append(Issue(key, "unknown_event_field", "unknown field"))
    _event_fields(event, now_ms, out)
    _source_fields(event, out)
    if "user" in event:
        _user(event["user"], out)
    _data(event, out)
    return out


def _event_fields(event: dict[str, Any], now_ms: int, out: list[Issue]) -> None:
    if not _is_text(event.get("id")):
        out.append(Issue("id", "invalid_event_field", "id must be a non-empty string"))
    kind = _str(event.get("type"))
    if kind not in DATA_TYPES:
        out.append(Issue("type", "invalid_event_type", "unknown event type"))
    ts = event.get("timestamp_ms")
    if not _is_int(ts):
        out.append(Issue("timestamp_ms", "invalid_event_field", "must be an integer"))
    elif ts > now_ms + MAX_AHEAD_MS:
        out.append(Issue("timestamp_ms", "event_timestamp_in_future", "too far ahead"))
    name = event.get("custom_event_name")
    if kind == "custom":
        if not (isinstance(name, str) and _CUSTOM_NAME.fullmatch(name)):
            out.append(Issue("custom_event_name", "invalid_custom_event_name", "bad name"))
        elif name.lower() in DATA_TYPES:
            out.append(Issue("custom_event_name", "invalid_custom_event_name", "standard name"))
    elif name is not None:
        out.append(Issue("custom_event_name", "invalid_event_field", "only for custom events"))


def _source_fields(event: dict[str, Any], out: list[Issue]) -> None:
    kind = _str(event.get("type"))
    if "oppref" in event and not isinstance(event["oppref"], str):
        out.append(Issue("oppref", "invalid_event_field", "must be a string"))
    source = event.get("action_source")
    if source is not None and _str(source) not in ACTION_SOURCES:
        out.append(Issue("action_source", "invalid_action_source", "unknown action source"))
    if kind in ("app_installed", "app_opened") and source != "mobile_app":
        out.append(Issue("action_source", "invalid_action_source", "must be mobile_app"))
    url = event.get("source_url")
    if url is None and source == "web":
        out.append(Issue("source_url", "missing_source_url", "required for web events"))
    elif url is not None and not _is_url(url):
        out.append(Issue("source_url", "invalid_source_url", "must be an absolute http(s) URL"))
    if "opt_out" in event and not isinstance(event["opt_out"], bool):
        out.append(Issue("opt_out", "invalid_event_field", "must be a boolean"))


def _user(user: Any, out: list[Issue]) -> None:
    if not isinstance(user, dict):
        out.append(Issue("user", "invalid_user", "user must be an object"))
        return
    for key in user.keys() - USER_KEYS:
        out.append(Issue(f"user.{key}", "unknown_user_field", "unknown field"))
    rules: dict[str, Callable[[Any], bool]] = {
        **{f"{h}_sha256": _matches(_HEX64) for h in HASHED},
        "regions": _is_place,
        "cities": _is_place,
        "postal_codes": _matches(_POSTAL),
        "countries": lambda v: isinstance(v, str) and v.upper() in _countries(),
    }
    for key, ok in rules.items():
        if key not in user:
            continue
        values = user[key]
        if not isinstance(values, list):
            out.append(Issue(f"user.{key}", "invalid_user_field", "must be a list"))
            continue
        out.extend(
            Issue(f"user.{key}[{i}]", "invalid_user_field", "invalid value")
            for i, v in enumerate(values)
            if not ok(v)
        )
    singles: dict[str, Callable[[Any], bool]] = {
        "ip_address": _is_ip,
        "user_agent": _is_text,
        "obref": _is_text,
        "android_advertising_id": _matches(_GAID),
    }
    for key, ok in singles.items():
        if key in user and not ok(user[key]):
            out.append(Issue(f"user.{key}", "invalid_user_field", "invalid value"))


def _data(event: dict[str, Any], out: list[Issue]) -> None:
    data = event.get("data")
    expected = DATA_TYPES.get(_str(event.get("type")) or "")
    if not isinstance(data, dict) or "type" not in data:
        out.append(Issue("data.type", "missing_event_data_type", "data.type is required"))
        return
    data_type = _str(data["type"])
    if data_type not in DATA_KEYS or (expected is not None and data_type != expected):
        out.append(Issue("data.type", "invalid_event_data_type", f"must be {expected}"))
        return
    allowed = DATA_KEYS[data_type]
    if allowed is not None:
        for key in data.keys() - allowed:
            out.append(Issue(f"data.{key}", "unknown_data_field", "unknown data field"))
    if "plan_id" in data and not _is_text(data["plan_id"]):
        out.append(Issue("data.plan_id", "invalid_data_field", "must be a non-empty string"))
    _money(data, "data", data.get("currency"), out)
    contents = data.get("contents")
    if "contents" not in data or (allowed is not None and "contents" not in allowed):
        return
    if not isinstance(contents, list):
        out.append(Issue("data.contents", "invalid_data_field", "must be a list"))
        return
    for i, item in enumerate(contents):
        _item(item, f"data.contents[{i}]", data.get("currency"), out)


def _item(item: Any, where: str, event_currency: Any, out: list[Issue]) -> None:
    if not isinstance(item, dict):
        out.append(Issue(where, "invalid_item", "must be an object"))
        return
    for key in item.keys() - ITEM_KEYS:
        out.append(Issue(f"{where}.{key}", "unknown_item_field", "unknown item field"))
    for key in ("id", "group_id", "name", "content_type"):
        if key in item and not _is_text(item[key]):
            out.append(Issue(f"{where}.{key}", "invalid_item_field", "must be non-empty"))
    if "quantity" in item and not _is_count(item["quantity"]):
        out.append(Issue(f"{where}.quantity", "invalid_item_field", "must be an integer"))
    variants = item.get("variant_dict", {})
    if not (isinstance(variants, dict) and all(isinstance(v, str) for v in variants.values())):
        out.append(Issue(f"{where}.variant_dict", "invalid_item_field", "string -> string"))
    # An item without a currency of its own uses the event-level one.
    _money(item, where, item.get("currency", event_currency), out)


def _money(priced: dict[str, Any], where: str, currency: Any, out: list[Issue]) -> None:
    if "currency" in priced and not (
        isinstance(priced["currency"], str) and priced["currency"].upper() in _currencies()
    ):
        out.append(Issue(f"{where}.currency", "invalid_currency", "not an ISO 4217 code"))
    if "amount" in priced:
        if not _is_count(priced["amount"]):
            out.append(Issue(f"{where}.amount", "invalid_amount", "integer minor units"))
        elif currency is None:
            out.append(Issue(f"{where}.currency", "missing_currency", "amount needs currency"))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and 0 <= value < 2**63


def _is_text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value.strip())


def _matches(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _is_place(value: Any) -> bool:
    return _is_text(value) and len(value.strip()) <= 128


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value.strip() if isinstance(value, str) else "")
    except ValueError:
        return False
    return True
