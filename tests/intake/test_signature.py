"""Signature checks: the HMAC-SHA256 Nylas documents, compared in constant time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nova_email.intake import sign, signature_matches

# The HMAC-SHA256 example from RFC 4231-style references (key "key"), so `sign` is checked against a value
# computed elsewhere, not against itself.
KNOWN_BODY = b"The quick brown fox jumps over the lazy dog"
KNOWN_SIGNATURE = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"


def test_sign_produces_the_lowercase_hex_hmac_sha256_of_the_raw_body() -> None:
    assert sign("key", KNOWN_BODY) == KNOWN_SIGNATURE


def test_the_right_signature_matches_in_either_case_and_with_surrounding_spaces() -> None:
    assert signature_matches("key", KNOWN_BODY, KNOWN_SIGNATURE)
    assert signature_matches("key", KNOWN_BODY, KNOWN_SIGNATURE.upper())
    assert signature_matches("key", KNOWN_BODY, f" {KNOWN_SIGNATURE} ")


@pytest.mark.parametrize(
    ("secret", "body", "header"),
    [
        ("key", KNOWN_BODY, None),
        ("key", KNOWN_BODY, ""),
        ("other", KNOWN_BODY, KNOWN_SIGNATURE),
        ("", KNOWN_BODY, sign("", KNOWN_BODY)),
        ("key", KNOWN_BODY + b" ", KNOWN_SIGNATURE),
        ("key", KNOWN_BODY, KNOWN_SIGNATURE[:-1]),
        ("key", KNOWN_BODY, KNOWN_SIGNATURE + "0"),
        ("key", KNOWN_BODY, "sha256=" + KNOWN_SIGNATURE),
        ("key", KNOWN_BODY, "é" * 64),
    ],
    ids=[
        "missing",
        "empty",
        "wrong-secret",
        "empty-secret",
        "body-changed",
        "truncated",
        "extended",
        "prefixed",
        "non-ascii",
    ],
)
def test_a_wrong_missing_or_malformed_signature_never_matches(secret: str, body: bytes, header: str | None) -> None:
    assert not signature_matches(secret, body, header)


@given(body=st.binary(max_size=512), other=st.binary(max_size=512))
def test_a_signature_matches_only_its_own_body(body: bytes, other: bytes) -> None:
    signature = sign("s3cret", body)
    assert signature_matches("s3cret", body, signature)
    assert signature_matches("s3cret", other, signature) == (other == body)
