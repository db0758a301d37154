"""What a stranger can make the receiver do before (and after) a signature checks out: bounded work, bounded
logs, bounded stored text."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import requests

from nova_email.config import Settings
from nova_email.intake import (
    MAX_REASON_CHARS,
    PREAUTH_INFLATION_RATIO,
    WEBHOOK_PATH,
    RunningIntake,
    serve_in_background,
    sign,
)

from .conftest import SECRET, audit_rows, envelope, post_signed


def _gzip_signed_over_inflated(body: bytes) -> dict[str, Any]:
    compressed = gzip.compress(body)
    return {
        "data": compressed,
        "headers": {"X-Nylas-Signature": sign(SECRET, body), "Content-Encoding": "gzip"},
        "ratio": len(body) / len(compressed),
    }


@pytest.mark.processes
def test_the_default_body_limit_is_close_to_what_nylas_sends(
    db_url: str, tmp_path: Path, conn: psycopg.Connection[Any]
) -> None:
    # Given a delivery of about 900 KiB (Nylas truncates larger messages) and a body just over 1 MiB
    document = json.loads(envelope("ntf_900_kib"))
    document["data"]["object"]["body"] = "x" * (900 * 1024)
    large_delivery = json.dumps(document).encode()
    settings = Settings(database_url=db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="warning")
    # When both are sent to a server started with the default limit
    with serve_in_background(settings, workers=1) as server, requests.Session() as http:
        accepted = post_signed(http, server, large_delivery)
        refused = http.post(server.webhook_url, data=b"x" * (1024 * 1024 + 1), timeout=10)
    # Then the delivery is accepted and the body over 1 MiB is refused
    assert (accepted.status_code, refused.status_code) == (200, 413)
    assert [row["webhook_id"] for row in audit_rows(conn)] == ["ntf_900_kib"]


@pytest.mark.processes
def test_a_signed_rejection_is_logged_without_quoting_the_body(
    db_url: str, tmp_path: Path, conn: psycopg.Connection[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    # Given a signed body whose id is a list holding text from the email
    canary = "canary-in-a-rejected-id"
    body = json.dumps({"id": [canary], "type": "message.created"}).encode()
    settings = Settings(database_url=db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="debug")
    with serve_in_background(settings, workers=1) as server, requests.Session() as http:
        capfd.readouterr()
        # When it is delivered
        answer = post_signed(http, server, body)
    # Then the log names the field and the problem, but never the value; the audit row keeps the full reason
    log = capfd.readouterr().err
    assert answer.status_code == 400
    [line] = [line for line in log.splitlines() if "Rejected a signed body" in line]
    assert "'id'" in line and "list" in line, line
    assert canary not in log
    [row] = audit_rows(conn)
    assert canary in row["error_message"]


def test_a_body_signed_before_compression_is_inflated_only_to_a_small_multiple_of_what_arrived(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    # Given two gzip bodies signed over their inflated JSON: one compresses like a delivery, one far better
    document = json.loads(envelope("ntf_ratio_low"))
    document["data"]["object"]["snippet"] = os.urandom(600).hex()
    ordinary = _gzip_signed_over_inflated(json.dumps(document).encode())
    padded = json.loads(envelope("ntf_ratio_high"))
    padded["data"]["object"]["snippet"] = " " * 40_000
    suspicious = _gzip_signed_over_inflated(json.dumps(padded).encode())
    assert ordinary["ratio"] < PREAUTH_INFLATION_RATIO < suspicious["ratio"]

    # When both are delivered
    accepted = http.post(server.webhook_url, data=ordinary["data"], headers=ordinary["headers"], timeout=5)
    refused = http.post(server.webhook_url, data=suspicious["data"], headers=suspicious["headers"], timeout=5)

    # Then the one that would need inflating past the bound before its signature is known is refused, unstored
    assert accepted.status_code == 200
    assert refused.status_code == 401
    assert [row["webhook_id"] for row in audit_rows(conn)] == ["ntf_ratio_low"]


def test_a_signed_rejection_stores_and_returns_a_bounded_reason(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    # Given a signed body whose id is a very long list (quoted in the reason it is rejected for)
    body = json.dumps({"id": ["x" * 16] * 3000, "type": "message.created"}).encode()

    answer = post_signed(http, server, body)

    assert answer.status_code == 400
    assert len(answer.json()["detail"]) <= MAX_REASON_CHARS
    [row] = audit_rows(conn)
    assert row["status"] == "rejected"
    assert len(row["error_message"]) <= MAX_REASON_CHARS


def _send_raw(server: RunningIntake, request: bytes) -> bytes:
    """Send `request` on a socket of its own and return the answer, read until the server closes."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
        raw.sendall(request)
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    return answer


@pytest.mark.processes
def test_a_flood_of_refused_requests_logs_one_warning(
    db_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    canary = "canary-in-a-malformed-request"
    settings = Settings(database_url=db_url, nylas_webhook_secret=SECRET, data_dir=tmp_path, log_level="info")
    with serve_in_background(settings, workers=1, max_body_bytes=1024) as server, requests.Session() as http:
        capfd.readouterr()
        # When strangers send 40 unsigned bodies and 40 oversized ones
        answers = [http.post(server.webhook_url, data=b"{}", timeout=5).status_code for _ in range(40)]
        answers += [http.post(server.webhook_url, data=b"x" * 2048, timeout=5).status_code for _ in range(40)]
        # And 40 requests the HTTP parser refuses: a bad request line, and a header name with a space in it
        bad_line = f"GARBAGE {canary} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        bad_header = f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nBad {canary}: v\r\n\r\n".encode()
        malformed = [_send_raw(server, request) for _ in range(20) for request in (bad_line, bad_header)]
        # And requests refused for their size, and a path outside the SCRIPT_NAME a local client claims
        too_long = f"GET /{canary}{'x' * 4200} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        outside = f"GET /{canary} HTTP/1.1\r\nHost: x\r\nSCRIPT_NAME: /elsewhere\r\n\r\n".encode()
        sized = [_send_raw(server, too_long) for _ in range(5)]
        misplaced = [_send_raw(server, outside) for _ in range(5)]
        # And one delivery that is fine, whose answer proves the refusals before it were handled
        assert post_signed(http, server, envelope("ntf_after_flood")).status_code == 200
    assert answers == [401] * 40 + [413] * 40
    assert all(answer.startswith(b"HTTP/1.1 400 ") for answer in malformed), malformed[:2]
    # Each answered with the status that names what was wrong, as gunicorn would
    assert all(answer.startswith(b"HTTP/1.1 414 ") for answer in sized), sized[:1]
    assert all(answer.startswith(b"HTTP/1.1 400 ") for answer in misplaced), misplaced[:1]
    # Then the log holds one warning about them, not a hundred and thirty, and no text of theirs
    log = capfd.readouterr().err
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "Refused" in warnings[0]
    assert canary not in log
