"""Identifier kinds: which kinds of identifier an event carries, by name, never by value.

The kinds are the ones match quality depends on (product.md's ``match_coverage`` keys)::

    email          user.emails_sha256
    phone          user.phone_numbers_sha256
    external_id    user.external_ids_sha256
    name           user.first_names_sha256 or user.last_names_sha256
    oppref         oppref (the click id)
    obref          user.obref (the Pixel's browser id)
    ip_user_agent  user.ip_address and user.user_agent, both
    aaid           user.android_advertising_id
    geo            user.regions, postal_codes, cities or countries

:func:`of` reads them from an event as it is sent, or from a raw event before hashing
(``user.email`` counts as ``email``), so a refused event can be described too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KINDS = (
    "email",
    "phone",
    "external_id",
    "name",
    "oppref",
    "obref",
    "ip_user_agent",
    "aaid",
    "geo",
)

_USER_FIELDS: dict[str, str] = {
    "emails_sha256": "email",
    "email": "email",
    "phone_numbers_sha256": "phone",
    "phone": "phone",
    "external_ids_sha256": "external_id",
    "external_id": "external_id",
    "first_names_sha256": "name",
    "last_names_sha256": "name",
    "first_name": "name",
    "last_name": "name",
    "obref": "obref",
    "android_advertising_id": "aaid",
    "regions": "geo",
    "postal_codes": "geo",
    "cities": "geo",
    "countries": "geo",
}


def of(event: Mapping[str, Any]) -> list[str]:
    """The kinds of identifier ``event`` carries, in :data:`KINDS` order."""
    found: set[str] = set()
    if event.get("oppref"):
        found.add("oppref")
    user = event.get("user")
    if isinstance(user, Mapping):
        found.update(kind for name, kind in _USER_FIELDS.items() if user.get(name))
        if user.get("ip_address") and user.get("user_agent"):
            found.add("ip_user_agent")
    return [k for k in KINDS if k in found]
