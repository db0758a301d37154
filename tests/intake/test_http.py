"""The intake over HTTP, against the real server (gunicorn on loopback) and real Postgres."""

from __future__ import annotations

import gzip
import json
import socket
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nova_email.intake import MAX_CHALLENGE_CHARS, RunningIntake, sign

from .conftest import MAX_BODY_BYTES, SECRET, audit_rows, envelope, post_signed, queued_jobs


def test_the_challenge_is_answered_with_the_bare_value(server: RunningIntake, http: requests.Session) -> None:
    value = "c7a9-ZZ_01~x"

    answer = http.get(server.webhook_url, params={"challenge": value}, timeout=5)

    assert answer.status_code == 200
    assert answer.content == value.encode()
    assert answer.headers["Content-Type"].startswith("text/plain")


def test_a_percent_encoded_challenge_is_answered_decoded(server: RunningIntake, http: requests.Session) -> None:
    value = "a+b/c=d~e.f_g-h"

    answer = http.get(f"{server.webhook_url}?challenge={quote(value, safe='')}", timeout=5)

    assert (answer.status_code, answer.text) == (200, value)
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Content-Security-Policy"] == "default-src 'none'"


@pytest.mark.parametrize(
    "value",
    ["<script>alert(1)</script>", "a b", "é", "x" * (MAX_CHALLENGE_CHARS + 1)],
    ids=["markup", "space", "non-ascii", "too-long"],
)
def test_a_challenge_nylas_could_not_have_sent_is_not_echoed(
    server: RunningIntake, http: requests.Session, value: str
) -> None:
    answer = http.get(server.webhook_url, params={"challenge": value}, timeout=5)

    assert answer.status_code == 400
    assert value not in answer.text
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_a_get_without_a_challenge_is_a_bad_request(server: RunningIntake, http: requests.Session) -> None:
    assert http.get(server.webhook_url, timeout=5).status_code == 400


def test_a_signed_delivery_is_answered_200_and_queued_once(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    answer = post_signed(http, server, envelope("ntf_http_1"))

    assert answer.status_code == 200
    assert answer.json()["status"] == "accepted"
    [row] = audit_rows(conn)
    assert (row["webhook_id"], row["status"], str(row["id"])) == (
        "ntf_http_1",
        "pending",
        answer.json()["notification_id"],
    )
    [job] = queued_jobs(conn)
    assert job["notification_id"] == answer.json()["notification_id"]
    assert job["payload"] == json.loads(envelope("ntf_http_1"))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Nylas-Signature": "0" * 64},
        {"X-Nylas-Signature": sign("not-the-secret", envelope("ntf_bad"))},
        {"X-Nylas-Signature": sign(SECRET, envelope("ntf_other"))},
        {"X-Nylas-Signature": "garbage"},
    ],
    ids=["missing", "zeros", "wrong-secret", "other-body", "not-hex"],
)
def test_a_delivery_without_the_right_signature_is_401_and_leaves_no_trace(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any], headers: dict[str, str]
) -> None:
    answer = http.post(server.webhook_url, data=envelope("ntf_bad"), headers=headers, timeout=5)

    assert answer.status_code == 401
    assert audit_rows(conn) == []
    assert queued_jobs(conn) == []


def test_a_lowercase_signature_header_name_is_accepted(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    body = envelope("ntf_lower")

    answer = http.post(server.webhook_url, data=body, headers={"x-nylas-signature": sign(SECRET, body)}, timeout=5)

    assert answer.status_code == 200
    assert len(audit_rows(conn)) == 1


def test_a_redelivery_is_answered_200_but_stored_and_queued_once(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    first = post_signed(http, server, envelope("ntf_again"))
    second = post_signed(http, server, envelope("ntf_again"))

    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.json()["status"], second.json()["status"]) == ("accepted", "duplicate")
    assert first.json()["notification_id"] == second.json()["notification_id"]
    assert len(audit_rows(conn)) == 1
    assert len(queued_jobs(conn)) == 1


@pytest.mark.parametrize(
    ("body", "reason_part"),
    [
        (b"{not json", "body is not JSON"),
        (b'{"id": "ntf_x"}', "'type'"),
        (b'{"type": "message.created"}', "'id'"),
        (b'"just a string"', "expected an object"),
        (b"\xc3\x28", "not UTF-8"),
    ],
    ids=["broken-json", "no-type", "no-id", "string", "not-utf8"],
)
def test_a_signed_malformed_body_is_400_and_audited_as_rejected(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any], body: bytes, reason_part: str
) -> None:
    answer = post_signed(http, server, body)

    assert answer.status_code == 400
    assert reason_part in answer.json()["detail"]
    [row] = audit_rows(conn)
    assert (row["status"], str(row["id"])) == ("rejected", answer.json()["notification_id"])
    assert reason_part in row["error_message"]
    assert row["raw_body"] == body.decode("utf-8", errors="replace")
    assert queued_jobs(conn) == []


def test_a_body_over_the_limit_is_413_and_leaves_no_trace(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    body = envelope("ntf_big")[:-1] + b', "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'

    answer = post_signed(http, server, body)

    assert answer.status_code == 413
    assert audit_rows(conn) == []


def test_a_chunked_body_over_the_limit_is_413_too(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    # A generator makes requests send Transfer-Encoding: chunked, with no Content-Length to check up front.
    body = envelope("ntf_chunked")[:-1] + b', "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))

    answer = http.post(server.webhook_url, data=chunks, headers={"X-Nylas-Signature": sign(SECRET, body)}, timeout=5)

    assert answer.status_code == 413
    assert audit_rows(conn) == []


def test_a_body_exactly_at_the_limit_is_accepted(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    head = envelope("ntf_limit")[:-1] + b', "pad": "'
    body = head + b"x" * (MAX_BODY_BYTES - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY_BYTES

    assert post_signed(http, server, body).status_code == 200
    assert len(queued_jobs(conn)) == 1


def test_a_chunked_signed_delivery_is_accepted(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    body = envelope("ntf_chunk_ok")
    chunks = (body[i : i + 50] for i in range(0, len(body), 50))

    answer = http.post(server.webhook_url, data=chunks, headers={"X-Nylas-Signature": sign(SECRET, body)}, timeout=5)

    assert answer.status_code == 200
    assert [row["webhook_id"] for row in audit_rows(conn)] == ["ntf_chunk_ok"]


def test_a_client_expecting_100_continue_gets_it_before_sending_the_body(
    server: RunningIntake, conn: psycopg.Connection[Any]
) -> None:
    body = envelope("ntf_expect_continue")
    address = urlsplit(server.url)
    head = (
        f"POST {urlsplit(server.webhook_url).path} HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Content-Type: application/json\r\nX-Nylas-Signature: {sign(SECRET, body)}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        # Given a client that sends its headers and holds the body back until the server says to go on
        sock.sendall(head.encode())
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        # When it sends the body
        sock.sendall(body)
        answer = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
        while chunk := sock.recv(4096):
            answer += chunk

    # Then the delivery is answered 200 and stored (an interim 100 may precede the final answer)
    final = answer.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
    assert final.startswith(b"HTTP/1.1 200 "), answer
    assert [row["webhook_id"] for row in audit_rows(conn)] == ["ntf_expect_continue"]


@pytest.mark.parametrize("signed", ["compressed", "inflated"])
def test_a_gzip_delivery_is_accepted_whichever_bytes_were_signed(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any], signed: str
) -> None:
    body = envelope(f"ntf_gzip_{signed}")
    compressed = gzip.compress(body)
    signature = sign(SECRET, compressed if signed == "compressed" else body)

    answer = http.post(
        server.webhook_url,
        data=compressed,
        headers={"X-Nylas-Signature": signature, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        timeout=5,
    )

    assert answer.status_code == 200
    [job] = queued_jobs(conn)
    assert job["payload"] == json.loads(body)


def test_a_signed_gzip_body_that_is_not_gzip_is_rejected(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    answer = post_signed(http, server, b"not gzip at all", **{"Content-Encoding": "gzip"})

    assert answer.status_code == 400
    assert audit_rows(conn)[0]["status"] == "rejected"


def test_a_gzip_body_that_inflates_past_the_limit_is_413(
    server: RunningIntake, http: requests.Session, conn: psycopg.Connection[Any]
) -> None:
    bomb = gzip.compress(b"[" + b" " * (MAX_BODY_BYTES * 4) + b"]")

    answer = post_signed(http, server, bomb, **{"Content-Encoding": "gzip"})

    assert answer.status_code == 413
    assert audit_rows(conn) == []


def test_health_and_readiness_report_a_working_server(server: RunningIntake, http: requests.Session) -> None:
    health = http.get(f"{server.url}/healthz", timeout=5)
    ready = http.get(f"{server.url}/readyz", timeout=5)

    assert (health.status_code, health.text) == (200, "ok")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": True, "functions": True, "signing_secret": True}


def test_metrics_are_not_served_on_the_public_port(server: RunningIntake, http: requests.Session) -> None:
    assert server.metrics_url is not None and not server.metrics_url.startswith(server.url + "/")
    assert http.get(f"{server.url}/metrics", timeout=5).status_code == 404


def _requests_counted(text: str, *, code: int, outcome: str, route: str = "/webhooks/nylas") -> float:
    prefix = f'nova_intake_requests_total{{code="{code}",outcome="{outcome}",route="{route}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_metrics_count_requests_by_route_outcome_and_status_code(server: RunningIntake, http: requests.Session) -> None:
    def count(text: str, outcome: str) -> float:
        return _requests_counted(text, code=401, outcome=outcome)

    assert server.metrics_url is not None
    before = http.get(server.metrics_url, timeout=5).text
    # Fresh connections, so that both gunicorn workers are likely to serve some of these.
    for index in range(6):
        requests.post(server.webhook_url, data=envelope(f"ntf_metrics_{index}"), timeout=5)
    answer = http.get(server.metrics_url, timeout=5)

    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert count(answer.text, "unauthorized") - count(before, "unauthorized") == 6
    # Whichever worker answers /metrics, it reports the same totals: they are summed over all workers.
    readings = {count(requests.get(server.metrics_url, timeout=5).text, "unauthorized") for _ in range(6)}
    assert readings == {count(answer.text, "unauthorized")}
    assert 'nova_intake_request_duration_seconds_bucket{le="0.005",route="/webhooks/nylas"}' in answer.text


def test_an_answer_the_app_does_not_name_is_counted_by_its_status_code(
    server: RunningIntake, http: requests.Session
) -> None:
    # Given the metrics before a request for a path the intake does not serve
    assert server.metrics_url is not None
    before = http.get(server.metrics_url, timeout=5).text

    # When it is answered (by the router, with no outcome of the app's)
    assert http.get(f"{server.url}/no-such-path", timeout=5).status_code == 404

    # Then the status code is in the code label, as in the Nylas series; the outcome label holds only names
    after = http.get(server.metrics_url, timeout=5).text
    counted = _requests_counted(after, code=404, outcome="other", route="unmatched")
    assert counted - _requests_counted(before, code=404, outcome="other", route="unmatched") == 1
    assert 'outcome="http_' not in after


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048) | st.builds(lambda text: text.encode(), st.text(max_size=200)))
def test_any_signed_body_gets_a_clear_answer_and_the_server_stays_up(
    server: RunningIntake, http: requests.Session, body: bytes
) -> None:
    answer = post_signed(http, server, body)

    assert answer.status_code in {200, 400}, answer.text
    assert http.get(f"{server.url}/healthz", timeout=5).status_code == 200
