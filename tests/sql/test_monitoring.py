"""get_sync_progress and get_webhook_metrics."""

from __future__ import annotations

import uuid

import psycopg
from psycopg.types.json import Jsonb

from .conftest import Inbox


def test_sync_progress_reports_counters_percent_and_status(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute("select initialize_sync_stats(%s)", (config_id,))
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, nylas_thread_id, status, messages_synced)"
        " select %s, %s, 'thr_' || n, case when n <= 2 then 'completed' when n = 3 then 'failed' else 'queued' end,"
        " case when n <= 2 then 5 else 0 end from generate_series(1, 8) n",
        (config_id, inbox.id),
    )
    cur = conn.execute("select * from get_sync_progress(%s)", (config_id,))
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    progress = dict(zip([c.name for c in cur.description], row, strict=True))
    assert {
        k: progress[k]
        for k in (
            "config_id",
            "inbox_id",
            "backfill_status",
            "threads_total",
            "threads_queued",
            "threads_processing",
            "threads_completed",
            "threads_failed",
            "messages_synced",
        )
    } == {
        "config_id": config_id,
        "inbox_id": inbox.id,
        "backfill_status": "thread_sync",
        "threads_total": 8,
        "threads_queued": 5,
        "threads_processing": 0,
        "threads_completed": 2,
        "threads_failed": 1,
        "messages_synced": 10,
    }
    assert str(progress["percent_complete"]) == "37.50"
    assert progress["sync_started_at"] is not None


def test_sync_progress_of_a_config_without_threads_is_zero_percent(
    conn: psycopg.Connection, config_id: uuid.UUID
) -> None:
    row = conn.execute("select threads_total, percent_complete from get_sync_progress(%s)", (config_id,)).fetchone()
    assert row is not None and (row[0], float(row[1])) == (0, 0.0)
    assert conn.execute("select * from get_sync_progress(%s)", (uuid.uuid4(),)).fetchall() == []


def test_webhook_metrics_group_recent_rows_by_type_and_status(conn: psycopg.Connection, inbox: Inbox) -> None:
    queue = "select notification_id from queue_nylas_webhook_notification(%s, %s, %s, %s)"
    ids = {}
    for webhook_id, kind in [
        ("n1", "message.created"),
        ("n2", "message.created"),
        ("n3", "grant.expired"),
        ("old", "message.created"),
    ]:
        row = conn.execute(queue, (webhook_id, kind, inbox.grant_id, Jsonb({}))).fetchone()
        assert row is not None
        ids[webhook_id] = row[0]
    conn.execute("select acknowledge_webhook_notification(%s, 'processed', null, 100)", (ids["n1"],))
    conn.execute("select acknowledge_webhook_notification(%s, 'processed', null, 300)", (ids["n2"],))
    conn.execute(
        "update flux_webhook_notifications set received_at = now() - interval '2 hours' where webhook_id = 'old'"
    )
    conn.execute("select record_rejected_webhook('junk', 'not json')")

    rows = conn.execute(
        "select notification_type, status, count, avg_duration_ms, max_duration_ms from get_webhook_metrics()"
    ).fetchall()
    assert [(r[0], r[1], r[2], r[3] and float(r[3]), r[4]) for r in rows] == [
        ("grant.expired", "pending", 1, None, None),
        ("message.created", "processed", 2, 200.0, 300),
        (None, "rejected", 1, None, None),
    ]
    wider = conn.execute("select sum(count) from get_webhook_metrics(interval '3 hours')").fetchone()
    assert wider == (5,)
