"""The service's three job queues are keyed by grant (nova_email/sql/095_fair_dispatch.sql): the SQL producers other
services call key their messages without knowing it, and fetches rotate across grants."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from importlib.resources import files

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from brokers.schema import apply_migrations, install_pgmq, load_migrations
from nova_email.migrate import SQL_DIR, migrate

from .conftest import Inbox

#: The fairness key of every message on a queue, oldest first.
KEYS = "select fairness_key from pgmq.{table} order by msg_id"


def keys(conn: psycopg.Connection, table: str) -> list[str]:
    return [row[0] for row in conn.execute(KEYS.format(table=table)).fetchall()]


def digest_of(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


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
    digest = digest_of(huge)

    conn.execute("select pgmq.send('thread_sync_jobs', %s)", [Jsonb({"grant_id": huge})])
    conn.execute("select * from queue_nylas_webhook_notification('wh-big', 'message.created', %s, '{}'::jsonb)", [huge])

    assert keys(conn, "q_thread_sync_jobs") == [digest]
    assert keys(conn, "q_nylas_webhook_notifications") == [digest]


def send_as_a_role_that_may_only_insert(url: str, grant_ids: list[str]) -> list[str]:
    """Send one thread job per grant id, by pgmq.send and by a plain insert, as a new role that holds nothing but
    USAGE on schema pgmq, INSERT on the queue's table and SELECT of its msg_id (pgmq.send returns it): another
    system producing onto the queue. Returns the keys stored, oldest first."""
    role = sql.Identifier(f"nova_producer_{secrets.token_hex(4)}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("create role {} nologin").format(role))
        try:
            conn.execute(sql.SQL("grant usage on schema pgmq to {}").format(role))
            conn.execute(sql.SQL("grant insert, select (msg_id) on pgmq.q_thread_sync_jobs to {}").format(role))
            with conn.transaction():
                conn.execute(sql.SQL("set local role {}").format(role))
                for grant_id in grant_ids:
                    conn.execute("select pgmq.send('thread_sync_jobs', %s)", [Jsonb({"grant_id": grant_id})])
                    conn.execute(
                        "insert into pgmq.q_thread_sync_jobs (vt, message) values (now(), %s)",
                        [Jsonb({"grant_id": grant_id})],
                    )
            return keys(conn, "q_thread_sync_jobs")
        finally:
            conn.execute(sql.SQL("drop owned by {}").format(role))
            conn.execute(sql.SQL("drop role {}").format(role))


def test_a_role_that_may_only_insert_into_a_fair_queue_sends_keys_of_any_length(db_url: str) -> None:
    # The queues' key column calls pgmq_broker.fair_key_of: every role that may insert may call it.
    huge = secrets.token_hex(3000)

    stored = send_as_a_role_that_may_only_insert(db_url, ["grant-short", huge])

    assert stored == ["grant-short", "grant-short", digest_of(huge), digest_of(huge)]


def test_a_database_migrated_before_keys_were_bounded_lets_such_a_role_send_too(empty_db_url: str) -> None:
    # Given a database that applied the broker's and the service's migrations of before bounded keys
    huge = secrets.token_hex(3000)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        install_pgmq(conn)
        broker = load_migrations(files("brokers").joinpath("sql"))
        apply_migrations(conn, namespace="brokers", migrations=[m for m in broker if m.version < 63])
        service = load_migrations(SQL_DIR)
        apply_migrations(conn, namespace="nova_email", migrations=[m for m in service if m.version < 96])
        # When it is migrated
        migrate(conn)

    # Then a role that may only insert sends keys of any length, as on a new database
    stored = send_as_a_role_that_may_only_insert(empty_db_url, ["grant-short", huge])

    assert stored == ["grant-short", "grant-short", digest_of(huge), digest_of(huge)]
