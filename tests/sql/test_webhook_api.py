"""Webhook intake (audit row + queue message, deduplicated), rejected bodies, acknowledgement."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import errors
from psycopg.types.json import Jsonb

from .conftest import Inbox, queue_messages, run_concurrently

QUEUE = "select * from queue_nylas_webhook_notification(%s, %s, %s, %s)"


def envelope(webhook_id: str, grant_id: str, kind: str = "message.created") -> dict[str, Any]:
    """A Nylas webhook body as the receiver gets it."""
    return {
        "specversion": "1.0",
        "type": kind,
        "id": webhook_id,
        "time": 1735776005,
        "data": {"application_id": "app-9", "object": {"object": "message", "id": "msg_1", "grant_id": grant_id}},
    }


def test_a_webhook_becomes_one_audit_row_and_one_queue_message(conn: psycopg.Connection, inbox: Inbox) -> None:
    body = envelope("ntf_001", inbox.grant_id)
    notification_id, msg_id, duplicate = conn.execute(
        QUEUE, ("ntf_001", "message.created", inbox.grant_id, Jsonb(body))
    ).fetchone() or (None, None, None)

    assert duplicate is False
    row = conn.execute(
        "select status, attempts, inbox_id, grant_id, payload, msg_id, received_at"
        " from flux_webhook_notifications where id = %s",
        (notification_id,),
    ).fetchone()
    assert row is not None
    status, attempts, inbox_id, grant_id, payload, row_msg_id, received_at = row
    assert (status, attempts, inbox_id, grant_id, payload, row_msg_id) == (
        "pending",
        0,
        inbox.id,
        inbox.grant_id,
        body,
        msg_id,
    )
    [message] = queue_messages(conn, "nylas_webhook_notifications")
    assert message == {
        "notification_id": str(notification_id),
        "webhook_id": "ntf_001",
        "inbox_id": str(inbox.id),
        "notification_type": "message.created",
        "grant_id": inbox.grant_id,
        "payload": body,
        "received_at": message["received_at"],
    }
    assert dt.datetime.fromisoformat(message["received_at"]) == received_at


def test_grant_comes_from_the_payload_when_not_given_and_unknown_grants_leave_inbox_null(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    conn.execute(QUEUE, ("ntf_a", "message.updated", None, Jsonb(envelope("ntf_a", inbox.grant_id))))
    conn.execute(QUEUE, ("ntf_b", "message.updated", "grant-unknown", Jsonb(envelope("ntf_b", "grant-unknown"))))
    messages = {m["webhook_id"]: m for m in queue_messages(conn, "nylas_webhook_notifications")}
    assert (messages["ntf_a"]["grant_id"], messages["ntf_a"]["inbox_id"]) == (inbox.grant_id, str(inbox.id))
    assert (messages["ntf_b"]["grant_id"], messages["ntf_b"]["inbox_id"]) == ("grant-unknown", None)


def test_an_explicit_inbox_wins_over_the_grant_lookup(conn: psycopg.Connection, make_inbox: Any) -> None:
    first, second = make_inbox(), make_inbox()
    conn.execute(
        "select * from queue_nylas_webhook_notification('ntf_x', 'grant.expired', %s, '{}', %s)",
        (first.grant_id, second.id),
    )
    [message] = queue_messages(conn, "nylas_webhook_notifications")
    assert message["inbox_id"] == str(second.id)


def test_the_same_webhook_id_twice_is_recorded_and_queued_once(conn: psycopg.Connection, inbox: Inbox) -> None:
    body = Jsonb(envelope("ntf_dup", inbox.grant_id))
    first = conn.execute(QUEUE, ("ntf_dup", "message.created", inbox.grant_id, body)).fetchone()
    second = conn.execute(QUEUE, ("ntf_dup", "message.created", inbox.grant_id, body)).fetchone()
    assert first is not None and second is not None
    assert second == (first[0], first[1], True)
    assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (1,)
    assert len(queue_messages(conn, "nylas_webhook_notifications")) == 1


def test_concurrent_deliveries_of_one_webhook_make_one_row_and_one_message(
    conn: psycopg.Connection, db_url: str, inbox: Inbox
) -> None:
    # Given eight receivers handling the same Nylas redelivery at the same moment
    body = Jsonb(envelope("ntf_race", inbox.grant_id))

    def deliver(worker: psycopg.Connection, _: int) -> tuple[Any, ...]:
        row = worker.execute(QUEUE, ("ntf_race", "message.created", inbox.grant_id, body)).fetchone()
        assert row is not None
        return tuple(row)

    results = run_concurrently(db_url, 8, deliver)

    # Then exactly one of them queued it and all agree on the row and message
    assert sorted(r[2] for r in results) == [False] + [True] * 7
    assert len({(r[0], r[1]) for r in results}) == 1
    assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (1,)
    assert len(queue_messages(conn, "nylas_webhook_notifications")) == 1


@pytest.mark.parametrize(
    ("webhook_id", "kind", "message"),
    [
        (None, "message.created", "webhook_id is empty"),
        (" ", "message.created", "webhook_id is empty"),
        ("ntf_1", None, "notification_type is empty"),
        ("ntf_1", "", "notification_type is empty"),
    ],
    ids=["null-id", "blank-id", "null-type", "empty-type"],
)
def test_a_webhook_without_id_or_type_is_refused_and_nothing_is_written(
    conn: psycopg.Connection, webhook_id: str | None, kind: str | None, message: str
) -> None:
    with pytest.raises(errors.InvalidParameterValue, match=message):
        conn.execute(QUEUE, (webhook_id, kind, "g", Jsonb({})))
    assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (0,)
    assert queue_messages(conn, "nylas_webhook_notifications") == []


def test_a_rejected_body_is_audited_without_a_queue_message(conn: psycopg.Connection) -> None:
    raw = "x" * (1048576 + 10)
    row = conn.execute("select record_rejected_webhook(%s, 'bad signature')", (raw,)).fetchone()
    assert row is not None
    audit = conn.execute(
        "select status, error_message, length(raw_body), processed_at is not null, webhook_id"
        " from flux_webhook_notifications where id = %s",
        (row[0],),
    ).fetchone()
    assert audit == ("rejected", "bad signature", 1048576, True, None)
    assert queue_messages(conn, "nylas_webhook_notifications") == []
    # Several rejected bodies coexist: a missing webhook id is not a duplicate.
    conn.execute("select record_rejected_webhook('{}', 'no id')")
    assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (2,)


def notification(conn: psycopg.Connection, inbox: Inbox, webhook_id: str = "ntf_ack") -> uuid.UUID:
    row = conn.execute(QUEUE, (webhook_id, "message.created", inbox.grant_id, Jsonb({}))).fetchone()
    assert row is not None
    return row[0]


def audit_row(conn: psycopg.Connection, notification_id: uuid.UUID) -> tuple[Any, ...]:
    row = conn.execute(
        "select status, attempts, error_message, processed_at is not null, processing_duration_ms"
        " from flux_webhook_notifications where id = %s",
        (notification_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_acknowledge_walks_a_notification_through_attempts_to_an_outcome(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    nid = notification(conn, inbox)
    ack = "select acknowledge_webhook_notification(%s, %s, %s, %s, %s)"

    assert conn.execute(ack, (nid, "processing", None, None, None)).fetchone() == (True,)
    assert audit_row(conn, nid) == ("processing", 1, None, False, None)

    conn.execute(ack, (nid, "error", "Nylas 503", 120, None))
    assert audit_row(conn, nid) == ("error", 1, "Nylas 503", True, 120)

    # A retry keeps the last error visible while it runs, then success clears it.
    conn.execute(ack, (nid, "processing", None, None, None))
    assert audit_row(conn, nid) == ("processing", 2, "Nylas 503", True, 120)
    conn.execute(ack, (nid, "processed", None, 45, 2))
    assert audit_row(conn, nid) == ("processed", 2, None, True, 45)

    conn.execute(ack, (nid, "ignored", "unhandled type", None, 7))
    assert audit_row(conn, nid) == ("ignored", 7, "unhandled type", True, 45)


def test_acknowledge_refuses_unknown_statuses(conn: psycopg.Connection, inbox: Inbox) -> None:
    nid = notification(conn, inbox)
    for status in ("pending", "rejected", "done", None):
        with pytest.raises(errors.InvalidParameterValue, match="Unknown webhook status"):
            conn.execute("select acknowledge_webhook_notification(%s, %s)", (nid, status))
    assert audit_row(conn, nid)[0] == "pending"


def test_acknowledge_returns_false_for_missing_or_rejected_notifications(conn: psycopg.Connection) -> None:
    rejected = conn.execute("select record_rejected_webhook('junk', 'not json')").fetchone()
    assert rejected is not None
    ack = "select acknowledge_webhook_notification(%s, 'processed')"
    assert conn.execute(ack, (uuid.uuid4(),)).fetchone() == (False,)
    assert conn.execute(ack, (rejected[0],)).fetchone() == (False,)
    assert conn.execute("select status from flux_webhook_notifications").fetchone() == ("rejected",)


def test_a_rolled_back_caller_leaves_neither_audit_row_nor_message(conn: psycopg.Connection, inbox: Inbox) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), conn.transaction():
        conn.execute(QUEUE, ("ntf_rb", "message.created", inbox.grant_id, Jsonb({})))
        raise Abort
    assert conn.execute("select count(*) from flux_webhook_notifications").fetchone() == (0,)
    assert queue_messages(conn, "nylas_webhook_notifications") == []


def test_an_explicit_inbox_that_does_not_exist_is_a_foreign_key_error(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.ForeignKeyViolation):
        conn.execute(
            "select * from queue_nylas_webhook_notification('ntf_fk', 'message.created', 'g', '{}', %s)",
            (uuid.uuid4(),),
        )
    assert queue_messages(conn, "nylas_webhook_notifications") == []


# Postgres text and jsonb cannot hold NUL; everything else a sender could put in a body must round-trip.
_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(webhook_id=_text, kind=_text, grant_id=st.none() | _text, body=st.dictionaries(_text, _json, max_size=5))
def test_arbitrary_bodies_are_either_queued_verbatim_or_refused_cleanly(
    conn: psycopg.Connection, webhook_id: str, kind: str, grant_id: str | None, body: dict[str, Any]
) -> None:
    # Examples share the test's database, so start each from an empty audit table and queue.
    conn.execute("truncate flux_webhook_notifications")
    conn.execute("select pgmq.purge_queue('nylas_webhook_notifications')")
    try:
        row = conn.execute(QUEUE, (webhook_id, kind, grant_id, Jsonb(body))).fetchone()
    except errors.InvalidParameterValue:
        assert not webhook_id.strip() or not kind.strip()
        return
    assert row is not None
    message = conn.execute(
        "select message from pgmq.q_nylas_webhook_notifications where msg_id = %s", (row[1],)
    ).fetchone()
    assert message is not None
    assert (message[0]["webhook_id"], message[0]["notification_type"], message[0]["payload"]) == (
        webhook_id,
        kind,
        body,
    )
