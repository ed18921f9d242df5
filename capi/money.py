"""Amounts as people write them: a decimal ``value`` becomes the API's integer ``amount``.

The API takes ``amount`` as an integer in the currency's minor unit (12999 for 129.99
USD, 8900 for 8900 JPY, 1000 for 1 KWD). People and shop systems write ``"129.99"``, so a
raw event may carry ``value`` (a decimal string, or a :class:`~decimal.Decimal` from
Python) beside its currency, under ``data`` and under each item of ``data.contents``;
:func:`apply_values` turns it into ``amount`` before the event is validated.

The rules: the currency's ISO 4217 exponent decides the scale; a value with more decimals
than the currency has is refused, never rounded (``"1.005"`` USD is a mistake somewhere,
and a rounded price is a wrong one); a float is refused, because a binary float cannot
hold most prices exactly; ``value`` and ``amount`` together are refused (which one is
meant?). An item without a currency of its own uses the event's.

pycountry, which supplies the currency codes, carries no exponents; :data:`EXPONENTS`
lists the codes whose exponent is not 2 (ISO 4217 list one, amendment 177, 2024), and
:data:`NO_MINOR_UNIT` the codes with none (precious metals, testing and fund codes), for
which only ``amount`` can be given.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from capi.errors import Problem
from capi.schema import currency_codes


def _codes(text: str) -> list[str]:
    return text.split()


EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        _codes("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"), 0
    ),
    **dict.fromkeys(_codes("BHD IQD JOD KWD LYD OMR TND"), 3),
    **dict.fromkeys(_codes("CLF UYW"), 4),  # units of account
}
"""ISO 4217 minor-unit exponents that are not 2; every other currency has 2."""

NO_MINOR_UNIT = frozenset(_codes("XAG XAU XBA XBB XBC XBD XDR XPD XPT XSU XTS XUA XXX"))
"""Codes ISO 4217 gives no minor unit ("N.A."): an amount, not a value, says what is meant."""

_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_MAX_DIGITS = 18  # the integer part of a value: amounts are 64-bit integers


def exponent(currency: str) -> int | None:
    """The minor-unit exponent of a currency code (2 unless listed), None when it has none."""
    code = currency.upper()
    if code in NO_MINOR_UNIT:
        return None
    return EXPONENTS.get(code, 2)


def apply_values(data: dict[str, Any], problems: list[Problem]) -> None:
    """Turn ``value`` into ``amount`` in ``data`` (the event's ``data`` copy) and its items,
    in place; each value that cannot be one is a problem naming its path."""
    currency = data.get("currency")
    if "value" in data:
        _apply(data, "data", currency, problems)
    contents = data.get("contents")
    if type(contents) is list:
        for i, item in enumerate(contents):
            if type(item) is dict and "value" in item:
                _apply(item, f"data.contents[{i}]", item.get("currency", currency), problems)


def _apply(priced: dict[str, Any], path: str, currency: Any, problems: list[Problem]) -> None:
    value = priced.pop("value")
    if "amount" in priced:
        problems.append(Problem(f"{path}.value", "give value or amount, not both"))
        return
    if not isinstance(currency, str):
        problems.append(Problem(f"{path}.currency", "is required when value is present"))
        return
    if currency.upper() not in currency_codes():
        return  # the schema names the bad currency
    try:
        priced["amount"] = minor_units(value, currency)
    except ValueError as exc:
        problems.append(Problem(f"{path}.value", str(exc)))


def minor_units(value: Any, currency: str) -> int:
    """``value`` (a decimal string, Decimal or int) in ``currency``'s minor unit; raise
    ValueError saying why it cannot be (never rounds)."""
    code = currency.upper()
    exp = exponent(code)
    if exp is None:
        raise ValueError(f"{code} has no minor unit in ISO 4217; give amount instead")
    number = _decimal(value)
    sign, digits, place = number.as_tuple()
    assert isinstance(place, int)  # _decimal refused NaN and infinity
    if sign and any(digits):
        raise ValueError("must not be negative")
    excess = -exp - place  # decimal places beyond what the currency has
    if excess > 0 and any(digits[-excess:]):
        raise ValueError(
            f"has more decimal places than {code} has ({exp}); capi never rounds a price: "
            "send the amount the customer was charged"
        )
    if number.adjusted() >= _MAX_DIGITS:
        raise ValueError("is too large for an amount")
    return int(number.scaleb(exp))


def _decimal(value: Any) -> Decimal:
    if isinstance(value, float):
        raise ValueError(
            'must be a decimal string such as "129.99", not a number with a fraction: a '
            "binary float cannot hold most prices exactly (0.1 + 0.2 != 0.3)"
        )
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError('must be a decimal string such as "129.99"')
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value.strip()):
            raise ValueError('must be a decimal number such as "129.99" (digits and one dot)')
        return Decimal(value.strip())
    number = Decimal(value)
    if not number.is_finite():
        raise ValueError('must be a decimal number such as "129.99"')
    return number
