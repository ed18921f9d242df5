from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capi.hashing import (
    Identifier,
    hash_identifier,
    is_sha256_hex,
    normalize_email,
    normalize_name,
    normalize_phone,
    sha256_hex,
)

# The contract's test vectors: normalized input -> sha256 hex.
VECTORS = [
    ("user@example.com", "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"),
    ("14155552671", "758fbf68945f21c416814c539ab578876c8d98fb69e6da692def92cd52417fe0"),
    ("ada", "fdee430d40bd57deeac186cd9790033d0f06f909a8806e7ce6e717ab7c7d5029"),
    ("lovelace", "fb1e7ec987523d2cb9e022cec1d6ae7c99dc46edfae4fe51254025fe4bea571f"),
    ("customer_123", "18f69bcd2f9cc9c38195e722b2a5590429840ea5090971d2256e026926e55fa1"),
    ("CUST-00042", "382211e688c29ae2dcce0b401999831aec27161d9bc0ffd092545a828a18bbc8"),
    ("oneill", "fa0fd24b2d0175a5c48e1b82f4d707a8a95f5279c4abdc43fa2f19d8e30eb47d"),
]


@pytest.mark.parametrize(("normalized", "digest"), VECTORS)
def test_contract_vectors(normalized: str, digest: str) -> None:
    assert sha256_hex(normalized) == digest


@pytest.mark.parametrize(
    ("kind", "raw", "normalized"),
    [
        (Identifier.EMAIL, " Ada@Example.COM ", "ada@example.com"),
        (Identifier.EMAIL, "USER@example.com", "user@example.com"),
        (Identifier.PHONE, "+1 (415) 555-2671", "14155552671"),
        (Identifier.PHONE, "0044.20.7946.0958", "442079460958"),
        (Identifier.EXTERNAL_ID, "  CUST-00042  ", "CUST-00042"),
        (Identifier.LAST_NAME, "O'Connor", "oconnor"),
        (Identifier.LAST_NAME, "O'Neill", "oneill"),
        (Identifier.FIRST_NAME, "José", "josé"),
        (Identifier.FIRST_NAME, " Ada ", "ada"),
        (Identifier.LAST_NAME, "Love-Lace", "lovelace"),
    ],
)
def test_normalization_then_hash(kind: Identifier, raw: str, normalized: str) -> None:
    assert hash_identifier(kind, raw) == sha256_hex(normalized)


@pytest.mark.parametrize(
    ("kind", "raw", "rule"),
    [
        (Identifier.EMAIL, "not-an-email", "email address"),
        (Identifier.EMAIL, "a b@example.com", "email address"),
        (Identifier.PHONE, "+1 415 555", "8 to 15 digits"),
        (Identifier.PHONE, "+1234567890123456", "8 to 15 digits"),
        (Identifier.PHONE, "call me 4155552671", "phone number"),
        (Identifier.EXTERNAL_ID, "   ", "must not be empty"),
        (Identifier.FIRST_NAME, "'. -", "at least one letter"),
        (
            Identifier.EMAIL,
            "B4C9A289323B21A01C3E940F150EB9B8C542587F1ABFD8F0E1CC1FFC5E475514",
            "emails_sha256",
        ),
    ],
)
def test_bad_identifiers_are_refused_with_the_rule(kind: Identifier, raw: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        hash_identifier(kind, raw)


@given(st.text())
def test_name_normalization_is_idempotent(value: str) -> None:
    try:
        once = normalize_name(value)
    except ValueError:
        return
    assert normalize_name(once) == once


@given(st.emails())
def test_email_normalization_is_idempotent(value: str) -> None:
    once = normalize_email(value)
    assert normalize_email(once) == once


@given(st.from_regex(r"\+?[0-9 ().-]{8,20}", fullmatch=True))
def test_phone_normalization_is_idempotent(value: str) -> None:
    try:
        once = normalize_phone(value)
    except ValueError:
        return
    assert normalize_phone(once) == once
    assert once.isdigit() and 8 <= len(once) <= 15


@given(st.sampled_from(list(Identifier)), st.text(min_size=1))
def test_never_hashes_a_hash(kind: Identifier, value: str) -> None:
    try:
        digest = hash_identifier(kind, value)
    except ValueError:
        return
    assert is_sha256_hex(digest)
    with pytest.raises(ValueError, match="already hashed"):
        hash_identifier(kind, digest)


def test_name_with_combining_marks_split_by_a_space_is_stable() -> None:
    # Found by hypothesis: removing the space leaves the marks out of canonical order.
    once = normalize_name("\u0339 \u0334")
    assert normalize_name(once) == once


def test_name_with_a_character_that_nfc_turns_into_punctuation() -> None:
    # Found by hypothesis: U+037E (Greek question mark) is ";" under NFC, and is dropped.
    assert normalize_name("0\u037e") == "0"
