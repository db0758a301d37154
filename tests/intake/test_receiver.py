"""The receiving path without HTTP: a signed body is queued once, or audited as rejected, against real Postgres."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nova_email.intake import InvalidWebhookBody, Receipt, Rejection, parse_envelope, receive

from .conftest import audit_rows, envelope, queued_jobs


def test_a_valid_envelope_is_audited_and_queued_with_the_documented_job_shape(conn: psycopg.Connection[Any]) -> None:
    # Given an inbox that owns the grant
    inbox_id = conn.execute(
        "insert into flux_inboxes (nylas_grant_id, email) values ('grant-123', 'ada@example.org') returning id"
    ).fetchone()[0]

    # When a delivery arrives
    result = receive(conn, envelope("ntf_001"))

    # Then one pending audit row and one job, which point at each other
    assert isinstance(result, Receipt) and not result.duplicate
    [row] = audit_rows(conn)
    assert (row["id"], row["webhook_id"], row["status"]) == (result.notification_id, "ntf_001", "pending")
    assert (row["grant_id"], row["inbox_id"], row["msg_id"]) == ("grant-123", inbox_id, result.msg_id)
    [job] = queued_jobs(conn)
    assert job["notification_id"] == str(result.notification_id)
    assert job["webhook_id"] == "ntf_001"
    assert job["notification_type"] == "message.created"
    assert job["inbox_id"] == str(inbox_id)
    assert job["payload"] == json.loads(envelope("ntf_001"))


def test_a_redelivery_returns_the_first_receipt_and_queues_nothing_more(conn: psycopg.Connection[Any]) -> None:
    first = receive(conn, envelope("ntf_dup"))
    again = receive(conn, envelope("ntf_dup"))

    assert isinstance(first, Receipt) and isinstance(again, Receipt)
    assert again.duplicate and not first.duplicate
    assert (again.notification_id, again.msg_id) == (first.notification_id, first.msg_id)
    assert len(audit_rows(conn)) == 1
    assert len(queued_jobs(conn)) == 1


@pytest.mark.parametrize(
    ("body", "reason_part"),
    [
        (b"not json", "body is not JSON"),
        (b"", "body is not JSON"),
        (b"[1, 2]", "expected an object"),
        (b'{"type": "message.created"}', "'id'"),
        (b'{"id": "ntf_1"}', "'type'"),
        (b'{"id": "  ", "type": "message.created"}', "'id'"),
        (b'{"id": 17, "type": "message.created"}', "'id'"),
        (json.dumps({"id": "x" * 300, "type": "message.created"}).encode(), "at most 256"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"id": "ntf_nan", "type": "message.created", "n": NaN}', "NaN"),
        (b'{"id": "ntf_nul", "type": "message.created", "s": "a\\u0000b"}', "refused by the database"),
        (b'{"id": "ntf_sur", "type": "message.created", "s": "\\ud800"}', "refused by the database"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"id": "ntf_big", "type": "t", "n": ' + b"9" * 5000 + b"}", "not usable JSON"),
    ],
    ids=[
        "text",
        "empty",
        "array",
        "no-id",
        "no-type",
        "blank-id",
        "numeric-id",
        "long-id",
        "not-utf8",
        "nan",
        "nul-escape",
        "lone-surrogate",
        "deep-nesting",
        "huge-integer",
    ],
)
def test_an_unusable_body_is_audited_as_rejected_with_its_reason_and_never_queued(
    conn: psycopg.Connection[Any], body: bytes, reason_part: str
) -> None:
    result = receive(conn, body)

    assert isinstance(result, Rejection)
    assert reason_part in result.reason
    [row] = audit_rows(conn)
    assert (row["id"], row["status"], row["webhook_id"]) == (result.notification_id, "rejected", None)
    assert row["error_message"] == result.reason
    assert row["raw_body"] == body.decode("utf-8", errors="replace")[: 1024 * 1024]
    assert row["processed_at"] is not None
    assert queued_jobs(conn) == []


def test_a_rejected_body_with_nul_bytes_is_stored_with_them_replaced(conn: psycopg.Connection[Any]) -> None:
    result = receive(conn, b"garbage\x00more")

    assert isinstance(result, Rejection)
    assert audit_rows(conn)[0]["raw_body"] == "garbage\ufffdmore"


def test_parse_envelope_keeps_the_body_text_as_received() -> None:
    body = b'{"type":"grant.expired",  "id":"ntf_003", "data": {"x": 1.50}}'

    parsed = parse_envelope(body)

    assert (parsed.webhook_id, parsed.notification_type, parsed.text) == ("ntf_003", "grant.expired", body.decode())


@given(body=st.binary(max_size=300))
def test_parse_envelope_raises_only_invalid_webhook_body_on_arbitrary_bytes(body: bytes) -> None:
    try:
        parse_envelope(body)
    except InvalidWebhookBody as exc:
        assert exc.reason


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extra=st.dictionaries(st.sampled_from(["id", "type", "data", "time", "x"]), _json_values, max_size=5),
    junk=st.binary(max_size=8),
)
def test_any_body_leaves_exactly_one_audit_row_pending_or_rejected(
    conn: psycopg.Connection[Any], extra: dict[str, Any], junk: bytes
) -> None:
    # Bodies built from JSON fragments, sometimes with junk appended: every one must end in a clear outcome.
    body = json.dumps(extra).encode() + junk
    before = conn.execute("select count(*) from flux_webhook_notifications").fetchone()[0]

    result = receive(conn, body)

    after = conn.execute("select count(*) from flux_webhook_notifications").fetchone()[0]
    status = conn.execute(
        "select status from flux_webhook_notifications where id = %s", (result.notification_id,)
    ).fetchone()[0]
    if isinstance(result, Rejection):
        assert (after - before, status) == (1, "rejected")
    elif result.duplicate:
        assert after == before
    else:
        assert (after - before, status) == (1, "pending")
