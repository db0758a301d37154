"""The three service queues and the flux_pgmq_* wrappers, including queue-name validation."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from .conftest import queue_messages

SERVICE_QUEUES = ["inbox_backfill_jobs", "nylas_webhook_notifications", "thread_sync_jobs"]


def test_the_three_service_queues_exist_with_the_brokers_statement_level_notifications(
    conn: psycopg.Connection,
) -> None:
    names = {row[0] for row in conn.execute("select queue_name from flux_pgmq_list_queues()")}
    assert set(SERVICE_QUEUES) <= names
    triggers = {
        row[0]
        for row in conn.execute(
            "select c.relname from pg_trigger t join pg_class c on c.oid = t.tgrelid"
            " where t.tgname = 'pgmq_broker_notify_insert'"
        )
    }
    assert {f"q_{name}" for name in SERVICE_QUEUES} <= triggers
    # PGMQ's own row trigger (one shared throttle row updated in every producer's transaction) is gone.
    assert conn.execute("select count(*) from pgmq.list_notify_insert_throttles()").fetchone() == (0,)


def test_sending_to_a_service_queue_notifies_listeners(conn: psycopg.Connection, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute('listen "pgmq.q_thread_sync_jobs.INSERT"')
        conn.execute("select flux_pgmq_send('thread_sync_jobs', '{\"thread_id\": \"t\"}')")
        notices = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in notices] == ["pgmq.q_thread_sync_jobs.INSERT"]


def test_send_read_delete_round_trip(conn: psycopg.Connection) -> None:
    msg_id = conn.execute("select flux_pgmq_send('thread_sync_jobs', '{\"thread_id\": \"thr_1\"}')").fetchone()
    assert msg_id is not None
    rows = conn.execute("select msg_id, read_ct, message from flux_pgmq_read('thread_sync_jobs', 30, 10)").fetchall()
    assert rows == [(msg_id[0], 1, {"thread_id": "thr_1"})]
    # Hidden for 30 s after the read.
    assert conn.execute("select * from flux_pgmq_read('thread_sync_jobs', 30, 10)").fetchall() == []
    assert conn.execute("select flux_pgmq_delete('thread_sync_jobs', %s)", msg_id).fetchone() == (True,)
    assert conn.execute("select flux_pgmq_delete('thread_sync_jobs', %s)", msg_id).fetchone() == (False,)


def test_a_delayed_message_is_invisible_until_its_delay_passes(conn: psycopg.Connection) -> None:
    conn.execute("select flux_pgmq_send('inbox_backfill_jobs', '{}', 3600)")
    assert conn.execute("select * from flux_pgmq_read('inbox_backfill_jobs', 30, 1)").fetchall() == []
    metrics = conn.execute(
        "select queue_name, queue_length, queue_visible_length, total_messages from flux_pgmq_metrics(%s)",
        ("inbox_backfill_jobs",),
    ).fetchone()
    assert metrics == ("inbox_backfill_jobs", 1, 0, 1)


@pytest.mark.parametrize(
    "call",
    [
        "select flux_pgmq_send(%(q)s, '{}')",
        "select * from flux_pgmq_read(%(q)s, 30, 1)",
        "select flux_pgmq_delete(%(q)s, 1)",
        "select * from flux_pgmq_metrics(%(q)s)",
    ],
    ids=["send", "read", "delete", "metrics"],
)
@pytest.mark.parametrize(
    "queue_name",
    ["no_such_queue", "thread_sync_jobs; drop table flux_inboxes; --", "q_thread_sync_jobs", "", None],
    ids=["unknown", "injection", "table-name", "empty", "null"],
)
def test_wrappers_refuse_names_that_are_not_existing_queues(
    conn: psycopg.Connection, call: str, queue_name: str | None
) -> None:
    with pytest.raises(errors.InvalidParameterValue, match="Unknown queue"):
        conn.execute(call, {"q": queue_name})
    assert conn.execute("select to_regclass('flux_inboxes') is not null").fetchone() == (True,)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("select flux_pgmq_send('thread_sync_jobs', '[1]')", "must be JSON objects"),
        ("select flux_pgmq_send('thread_sync_jobs', '{}', -1)", "delay_seconds must be >= 0"),
        ("select * from flux_pgmq_read('thread_sync_jobs', -1, 1)", "visibility_timeout must be >= 0"),
        ("select * from flux_pgmq_read('thread_sync_jobs', 30, 0)", "qty must be between 1 and 1000"),
        ("select * from flux_pgmq_read('thread_sync_jobs', 30, 1001)", "qty must be between 1 and 1000"),
    ],
    ids=["array-message", "negative-delay", "negative-vt", "zero-qty", "huge-qty"],
)
def test_wrappers_refuse_bad_arguments_with_a_clear_message(conn: psycopg.Connection, call: str, message: str) -> None:
    with pytest.raises(errors.InvalidParameterValue, match=message):
        conn.execute(call)
    assert queue_messages(conn, "thread_sync_jobs") == []
