"""The service's three job queues are keyed by grant (nova_email/sql/095_fair_dispatch.sql): the SQL producers other
services call key their messages without knowing it, and fetches rotate across grants."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable

import psycopg
from psycopg.types.json import Jsonb

from .conftest import Inbox

#: The fairness key of every message on a queue, oldest first.
KEYS = "select fairness_key from pgmq.{table} order by msg_id"


def keys(conn: psycopg.Connection, table: str) -> list[str]:
    return [row[0] for row in conn.execute(KEYS.format(table=table)).fetchall()]


def test_the_sql_producers_key_every_job_by_its_grant(
    conn: psycopg.Connection, make_inbox: Callable[..., Inbox], config_id: uuid.UUID, inbox: Inbox
) -> None:
    other = make_inbox()

    conn.execute("select queue_thread_sync('thr_1', %s, %s, %s)", (inbox.grant_id, inbox.id, config_id))
    conn.execute("select * from queue_inbox_backfill(%s)", (other.id,))
    conn.execute(
        "select * from queue_nylas_webhook_notification('wh-1', 'message.created', %s, '{}'::jsonb)", (other.grant_id,)
    )

    assert keys(conn, "q_thread_sync_jobs") == [inbox.grant_id]
    assert keys(conn, "q_inbox_backfill_jobs") == [other.grant_id]
    assert keys(conn, "q_nylas_webhook_notifications") == [other.grant_id]


def test_thread_jobs_of_a_second_grant_are_fetched_before_the_first_grants_backlog(
    conn: psycopg.Connection, make_inbox: Callable[..., Inbox], config_id: uuid.UUID, inbox: Inbox
) -> None:
    late = make_inbox()
    for n in range(50):
        conn.execute("select queue_thread_sync(%s, %s, %s, %s)", (f"thr_{n}", inbox.grant_id, inbox.id, config_id))
    conn.execute("select queue_thread_sync('thr_late', %s, %s, null)", (late.grant_id, late.id))

    rows = conn.execute("select fairness_key from pgmq_broker.fair_read('thread_sync_jobs', 2, 30000)").fetchall()

    assert sorted(row[0] for row in rows) == sorted([inbox.grant_id, late.grant_id])


def test_a_grant_id_longer_than_an_index_row_is_queued_by_every_producer(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    # 6 kB that do not compress: more than a btree index row may hold; the queues key it by its digest instead.
    huge = secrets.token_hex(3000)
    digest = "sha256:" + hashlib.sha256(huge.encode()).hexdigest()

    conn.execute("select pgmq.send('thread_sync_jobs', %s)", [Jsonb({"grant_id": huge})])
    conn.execute("select * from queue_nylas_webhook_notification('wh-big', 'message.created', %s, '{}'::jsonb)", [huge])

    assert keys(conn, "q_thread_sync_jobs") == [digest]
    assert keys(conn, "q_nylas_webhook_notifications") == [digest]
