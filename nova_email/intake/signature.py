"""Nylas webhook signatures: lowercase hex HMAC-SHA256 of the raw request body, keyed with the webhook secret.

Verify the bytes exactly as they arrived, before parsing them: re-serialised JSON never matches.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["SIGNATURE_HEADER", "sign", "signature_matches"]

#: The header Nylas puts the signature in (HTTP header names are case-insensitive).
SIGNATURE_HEADER = "X-Nylas-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature Nylas sends for `body`: use it in tests, benchmarks and tools that replay deliveries."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_matches(secret: str, body: bytes, header_value: str | None) -> bool:
    """True when `header_value` is the signature of `body` under `secret`.

    The comparison takes the same time wherever the first differing character is, so a caller cannot find the
    signature one character at a time. A missing header, an empty secret or a value that is not 64 hex characters
    is simply a mismatch. Upper-case hex is accepted: it encodes the same digest.
    """
    if not secret or not header_value:
        return False
    expected = sign(secret, body)
    # compare_digest needs ASCII on both sides for str; a non-ASCII header cannot match anyway.
    candidate = header_value.strip().lower()
    if not candidate.isascii():
        return False
    return hmac.compare_digest(expected, candidate)
