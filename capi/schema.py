"""The API's event schema as pydantic models: the one module to edit when the API changes.

The models describe events *as sent*: user identifiers already hashed. Raw identifiers,
cross-field rules and the time window are handled by :mod:`capi.events`.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from typing import Annotated, Literal

import pycountry
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from capi.hashing import check_hashed

STANDARD_TYPES: dict[str, str] = {
    "registration_completed": "customer_action",
    "lead_created": "customer_action",
    "appointment_scheduled": "customer_action",
    "app_installed": "customer_action",
    "app_opened": "customer_action",
    "order_created": "contents",
    "checkout_started": "contents",
    "contents_viewed": "contents",
    "items_added": "contents",
    "page_viewed": "contents",
    "subscription_created": "plan_enrollment",
    "trial_started": "plan_enrollment",
}
DATA_TYPE_OF: dict[str, str] = {**STANDARD_TYPES, "custom": "custom"}
APP_EVENT_TYPES = frozenset({"app_installed", "app_opened"})
EventType = Literal[
    "registration_completed",
    "lead_created",
    "appointment_scheduled",
    "app_installed",
    "app_opened",
    "order_created",
    "checkout_started",
    "contents_viewed",
    "items_added",
    "page_viewed",
    "subscription_created",
    "trial_started",
    "custom",
]
ActionSource = Literal[
    "web", "mobile_app", "offline", "physical_store", "phone_call", "email", "other"
]


@cache
def currency_codes() -> frozenset[str]:
    """The ISO 4217 currency codes (from pycountry's copy of the standard)."""
    return frozenset(c.alpha_3 for c in pycountry.currencies)


@cache
def country_codes() -> frozenset[str]:
    """The ISO 3166-1 alpha-2 country codes."""
    return frozenset(c.alpha_2 for c in pycountry.countries)


def short(value: str, limit: int = 16) -> str:
    """A bad value as quoted in a refusal: its first ``limit`` characters at most."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _code_given(value: str) -> str:
    """What a refused code field got: a short run of letters is quoted (a typo such as
    'USDD'); anything else may be personal data put in the wrong field (an email given as
    the currency) and is described, never quoted."""
    if value.isascii() and value.isalpha() and len(value) <= 8:
        return f"got {value!r}"
    return f"got a {len(value):,}-character value that is not a code (not shown)"


def currency(value: str) -> str:
    """An ISO 4217 currency code, uppercased; ValueError naming the rule otherwise."""
    code = value.upper()
    if code not in currency_codes():
        raise ValueError(
            f"must be an ISO 4217 currency code such as USD, EUR, JPY; {_code_given(value)}"
        )
    return code


def country(value: str) -> str:
    """An ISO 3166-1 alpha-2 country code, uppercased; ValueError otherwise."""
    code = value.upper()
    if code not in country_codes():
        raise ValueError(
            f"must be an ISO 3166-1 alpha-2 country code such as US; {_code_given(value)}"
        )
    return code


def event_id(value: str) -> str:
    """An event id: not blank, without control characters; ValueError otherwise."""
    if not value.strip():
        raise ValueError("must not be blank")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (NUL, newline, tab, ...)")
    return value


def non_blank(value: str) -> str:
    """Text that is not only whitespace; ValueError otherwise."""
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def postal_code(value: str) -> str:
    """A postal code: 1-32 letters, digits, spaces or hyphens; ValueError otherwise."""
    if not _POSTAL_CODE.fullmatch(value):
        raise ValueError("must be 1-32 letters, digits, spaces or hyphens")
    return value


def place(value: str) -> str:
    """A region or city: not blank, at most MAX_PLACE_CHARS characters; ValueError otherwise."""
    if not value.strip():
        raise ValueError("must not be blank")
    if len(value.strip()) > MAX_PLACE_CHARS:
        raise ValueError(f"must be at most {MAX_PLACE_CHARS} characters")
    return value


def gaid(value: str) -> str:
    """A Google advertising id in UUID form, not all zeros (the id of a device that limits
    ad tracking, which the API ignores: sent, it would count as a match identifier it is
    not); ValueError otherwise."""
    if not _UUID.fullmatch(value):
        raise ValueError(
            "must be a Google advertising id in UUID form "
            "(8-4-4-4-12 hex digits; IDFA is not supported)"
        )
    if not value.strip("0-"):
        raise ValueError("is all zeros (a device that limits ad tracking), which the API ignores")
    return value


def ip(value: str) -> str:
    """An IPv4 or IPv6 address in its canonical form, an IPv4 address seen through an IPv6
    socket (``::ffff:203.0.113.5``) as the IPv4 address it is; ValueError otherwise."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


# Unicode category Cc, which is fixed by the standard: C0, DEL and C1 (tested exhaustively).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_POSTAL_CODE = re.compile(r"[A-Za-z0-9 -]{1,32}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_PLACE_CHARS = 128
INT64_MAX = 2**63 - 1

Currency = Annotated[str, AfterValidator(currency)]
Country = Annotated[str, AfterValidator(country)]
Sha256 = Annotated[str, AfterValidator(check_hashed)]
NonEmpty = Annotated[str, Field(min_length=1)]
NonBlank = Annotated[str, Field(min_length=1), AfterValidator(non_blank)]
Place = Annotated[str, Field(min_length=1), AfterValidator(place)]
MinorUnits = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Count = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)


class _Priced(_Model):
    amount: MinorUnits | None = None
    currency: Currency | None = None


class Item(_Priced):
    """One line of ``data.contents``: a product, with its price in minor units."""

    id: NonEmpty | None = None
    group_id: NonEmpty | None = None
    name: NonEmpty | None = None
    content_type: NonEmpty | None = None
    quantity: Count | None = None
    variant_dict: dict[str, str] | None = None


class CustomerActionData(_Priced):
    """``data`` of signup-like events; has no ``contents``."""

    type: Literal["customer_action"]


class ContentsData(_Priced):
    """``data`` of purchase-like events."""

    type: Literal["contents"]
    contents: list[Item] | None = None


class PlanEnrollmentData(_Priced):
    """``data`` of subscription and trial events."""

    type: Literal["plan_enrollment"]
    plan_id: NonEmpty | None = None
    contents: list[Item] | None = None


class CustomData(_Priced):
    """``data`` of custom events: the plan fields plus any extra keys."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["custom"]
    plan_id: NonEmpty | None = None
    contents: list[Item] | None = None


Data = Annotated[
    CustomerActionData | ContentsData | PlanEnrollmentData | CustomData,
    Field(discriminator="type"),
]
DATA_MODELS: dict[str, type[_Model]] = {
    "customer_action": CustomerActionData,
    "contents": ContentsData,
    "plan_enrollment": PlanEnrollmentData,
    "custom": CustomData,
}


class User(_Model):
    """Who converted: hashed identifiers as lists, plus raw location and device fields."""

    emails_sha256: list[Sha256] | None = None
    phone_numbers_sha256: list[Sha256] | None = None
    external_ids_sha256: list[Sha256] | None = None
    first_names_sha256: list[Sha256] | None = None
    last_names_sha256: list[Sha256] | None = None
    regions: list[Place] | None = None
    postal_codes: list[Annotated[str, AfterValidator(postal_code)]] | None = None
    cities: list[Place] | None = None
    countries: list[Country] | None = None
    ip_address: Annotated[str, AfterValidator(ip)] | None = None
    user_agent: NonBlank | None = None
    obref: NonBlank | None = None
    android_advertising_id: Annotated[str, AfterValidator(gaid)] | None = None


class Event(_Model):
    """One conversion event in the API's format, as it is queued and sent."""

    id: Annotated[str, Field(min_length=1), AfterValidator(event_id)]
    type: EventType
    timestamp_ms: StrictInt
    custom_event_name: str | None = None
    oppref: NonEmpty | None = None
    source_url: str | None = None
    action_source: ActionSource | None = None
    user: User | None = None
    opt_out: StrictBool | None = None
    data: Data

    @property
    def name(self) -> str:
        """The name the API dedups on: the custom event name, lowercased, or the type."""
        if self.type == "custom" and self.custom_event_name:
            return self.custom_event_name.lower()
        return self.type

    def to_json(self) -> bytes:
        """The event as the API expects it, compact JSON without unset fields."""
        # What model_dump_json() calls, without its per-call Python wrapper and a decode.
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)


@cache
def field_names() -> frozenset[str]:
    """The name of every field of an event's models, at any depth."""
    names: set[str] = set()
    models: list[type[BaseModel]] = [_Model]
    while models:
        model = models.pop()
        names.update(model.model_fields)
        models += model.__subclasses__()
    return frozenset(names)


def allowed_fields(model: type[BaseModel]) -> list[str]:
    """The field names a model accepts, in declaration order."""
    return list(model.model_fields)
