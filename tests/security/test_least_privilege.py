"""The workers run under the least-privilege role ``nova_worker`` (nova_email/sql/090_worker_role.sql, narrowed by
nova_email/sql/091_worker_role_narrow.sql) and still do all their work.

A login role that holds nothing but ``nova_worker`` runs a whole backfill with live webhooks through real dramatiq
processes; the result must equal the mailbox exactly. The same role must be refused everything the workers do not
need: DDL, TRUNCATE, deleting the service's rows, the broker's admin functions (flush, replay, purge), tables the
owner creates later in public, other schemas, creating roles or databases.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import scalar_row

from brokers import queries as broker_queries
from brokers.fairness import fair_fetch_query
from nova_email.intake import queries as intake_queries
from nova_email.simulator.server import start_in_thread
from nova_email.simulator.webhooks import SqlIntakeEmitter
from tests.chaos.scenario import backfill_status, queue_backfill, run_problems, worker_env
from tests.processes import running_workers, wait_for

GRANT = "grant-least-privilege"
#: The parameters of the broker's fetch: lease one message, acknowledge none.
FETCH_ONE = {"ack_ids": [], "ack_tokens": [], "archive": False, "qty": 1, "vt_ms": 30_000, "async_commit": False}
#: The service's functions in public (not an extension's): 091 grants the workers what they call, function by
#: function, so that they keep working where PUBLIC's default EXECUTE on them has been revoked.
SERVICE_FUNCTIONS = sql.SQL("""
select p.oid::regprocedure::text from pg_proc p
 where p.pronamespace = 'public'::regnamespace
   and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                                              and d.deptype = 'e')
""")


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _signature(conn: psycopg.Connection[Any], function: str) -> str:
    """The full signature of a function known by its (unique) qualified name."""
    with conn.cursor(row_factory=scalar_row) as cursor:
        return str(cursor.execute("select %s::regproc::regprocedure::text", [function]).fetchone())


@pytest.fixture
def no_public_execute(db_url: str) -> Iterator[None]:
    """PUBLIC's EXECUTE on the service's functions revoked for the test (and given back after it)."""
    with psycopg.connect(db_url, autocommit=True) as admin:
        functions = [row[0] for row in admin.execute(SERVICE_FUNCTIONS)]
        for function in functions:
            admin.execute(sql.SQL("revoke execute on function {} from public").format(sql.SQL(function)))
    try:
        yield
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            for function in functions:
                admin.execute(sql.SQL("grant execute on function {} to public").format(sql.SQL(function)))


@pytest.fixture
def worker_url(db_url: str) -> Iterator[str]:
    """A URL of the test database for a fresh login role whose only privilege is membership of nova_worker."""
    user = f"nova_app_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("create role {} login password {} in role nova_worker").format(
                sql.Identifier(user), sql.Literal(password)
            )
        )
    try:
        yield _as_user(db_url, user, password)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop role {}").format(sql.Identifier(user)))


def test_the_worker_role_cannot_log_in_and_holds_no_power(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "select rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication"
        " from pg_roles where rolname = 'nova_worker'"
    ).fetchone()
    assert row == (False, False, False, False, False, False)


@pytest.mark.parametrize(
    "statement",
    [
        "create table public.h9_forbidden (id int)",
        "create table pgmq.q_h9_forbidden (id int)",
        "select pgmq.create('h9_forbidden')",
        "drop table flux_email_messages",
        "alter table flux_inboxes add column x int",
        "truncate flux_email_messages",
        "truncate pgmq.q_thread_sync_jobs",
        "create function public.h9_forbidden() returns int language sql as 'select 1'",
        "create schema h9_forbidden",
        "create role h9_forbidden",
        "delete from pgmq_broker.schema_migrations",
        "alter role nova_worker login",
        # No worker deletes a row of the service's tables
        "delete from flux_inboxes",
        "delete from flux_email_messages",
        "delete from flux_email_threads",
        "delete from queued_threads",
        "delete from flux_webhook_notifications",
        # The broker's admin functions and tables are the owner's
        "select pgmq_broker.flush('thread_sync_jobs')",
        "select pgmq_broker.purge_archive('thread_sync_jobs', 0)",
        "select pgmq_broker.replay_dead_letters(null, null, 10)",
        "delete from pgmq_broker.dead_letters",
        "select pgmq_broker.enable_notify('thread_sync_jobs')",
        "select pgmq_broker.disable_notify('thread_sync_jobs')",
        "update pgmq.meta set queue_name = queue_name",
        "update pgmq.notify_insert_throttle set queue_name = queue_name",
    ],
)
def test_the_worker_role_is_refused_what_workers_do_not_need(worker_url: str, statement: str) -> None:
    with psycopg.connect(worker_url, autocommit=True) as conn:
        with pytest.raises((errors.InsufficientPrivilege, errors.DependentObjectsStillExist)):
            conn.execute(statement)


def test_the_worker_role_cannot_reach_what_the_owner_creates_later_in_public(
    worker_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Given a table, a sequence and a function another application creates in public after the migrations
    name = f"h9_later_{secrets.token_hex(4)}"
    table, sequence, function = (sql.Identifier(name + suffix) for suffix in ("", "_seq", "_fn"))
    conn.execute(sql.SQL("create table public.{} (id int)").format(table))
    conn.execute(sql.SQL("create sequence public.{}").format(sequence))
    conn.execute(sql.SQL("create function public.{}() returns int language sql as 'select 1'").format(function))
    conn.execute(sql.SQL("revoke execute on function public.{}() from public").format(function))
    try:
        # Then the worker role can neither read nor write them, nor call the function
        statements = [
            sql.SQL("select * from public.{}").format(table),
            sql.SQL("insert into public.{} values (1)").format(table),
            sql.SQL("update public.{} set id = 2").format(table),
            sql.SQL("delete from public.{}").format(table),
            sql.SQL("select nextval('public.{}')").format(sequence),
            sql.SQL("select public.{}()").format(function),
        ]
        with psycopg.connect(worker_url, autocommit=True) as worker:
            for statement in statements:
                with pytest.raises(errors.InsufficientPrivilege):
                    worker.execute(statement)
    finally:
        conn.execute(sql.SQL("drop function public.{}()").format(function))
        conn.execute(sql.SQL("drop sequence public.{}").format(sequence))
        conn.execute(sql.SQL("drop table public.{}").format(table))


def test_the_worker_role_may_call_the_fetch_of_a_queue_put_in_fairness_mode_later(
    worker_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Given, after the migrations, a queue the owner puts in fairness mode (its fetch function is new), takes out of it
    # and puts back (the fetch is dropped and created again)
    queue = f"fair_later_{secrets.token_hex(3)}"
    conn.execute("select pgmq_broker.enable_fairness(%s, '{tenant}')", [queue])
    conn.execute("select pgmq_broker.disable_fairness(%s)", [queue])
    conn.execute("select pgmq_broker.enable_fairness(%s, '{tenant}')", [queue])
    conn.execute('select pgmq.send(%s, \'{"tenant": "t"}\')', [queue])
    fetch = _signature(conn, f"pgmq_broker.fair_fetch_{queue}")
    try:
        # Then the workers may call it (the broker's statement for a fair queue), and PUBLIC may not, as for the
        # broker's own fetch (091 revoked PUBLIC's EXECUTE in pgmq_broker)
        with psycopg.connect(worker_url, autocommit=True) as worker:
            assert len(worker.execute(fair_fetch_query(queue), FETCH_ONE).fetchall()) == 1
        public = conn.execute("select has_function_privilege('public', %s, 'execute')", [fetch]).fetchone()
        assert public == (False,)
    finally:
        conn.execute("select pgmq_broker.disable_fairness(%s)", [queue])
        conn.execute("select pgmq.drop_queue(%s)", [queue])


def test_the_worker_role_may_use_the_queues_and_the_sql_api(worker_url: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(worker_url, autocommit=True) as worker:
        msg_id = worker.execute("select flux_pgmq_send('thread_sync_jobs', '{\"x\": 1}'::jsonb)").fetchone()
        assert msg_id is not None
        read = worker.execute("select msg_id from flux_pgmq_read('thread_sync_jobs', 30, 1)").fetchone()
        assert read == msg_id
        assert worker.execute("select flux_pgmq_delete('thread_sync_jobs', %s)", [msg_id[0]]).fetchone() == (True,)
        # The broker's first use of an existing queue in a process (pgmq.create is never reached)
        worker.execute(broker_queries.CREATE_QUEUE, {"queue": "thread_sync_jobs"})
        assert worker.execute(broker_queries.QUEUE_METRICS, {"queue": "thread_sync_jobs"}).fetchone() is not None


@pytest.mark.usefixtures("no_public_execute")
def test_the_worker_role_holds_every_backfill_function_it_calls_without_public(worker_url: str) -> None:
    called = [
        "start_backfill_slice(uuid)",
        "record_listed_page(uuid, jsonb, text, integer, timestamptz)",
        "record_backfill_page(uuid, jsonb, text, integer, timestamptz)",
        "flux_stored_thread_is_current(uuid, jsonb)",
        "continue_backfill_listing(uuid, integer)",
        "finish_backfill_listing(uuid)",
        "record_backfill_failure(uuid, text)",
    ]
    with psycopg.connect(worker_url) as worker:
        held = {
            function: worker.execute("select has_function_privilege(%s, 'execute')", [function]).fetchone()
            for function in called
        }
    assert held == dict.fromkeys(called, (True,))


def test_the_webhook_intake_works_under_the_worker_role(worker_url: str, conn: psycopg.Connection[Any]) -> None:
    # `nova-email serve-webhooks` runs with the workers' DATABASE_URL: both of its SQL functions must work
    payload = json.dumps({"id": "wh-least-privilege", "type": "message.created", "data": {"object": {"grant_id": "g"}}})
    params = {"webhook_id": "wh-least-privilege", "notification_type": "message.created", "payload": payload}
    with psycopg.connect(worker_url, autocommit=True) as worker:
        first = worker.execute(intake_queries.QUEUE_WEBHOOK, params).fetchone()
        again = worker.execute(intake_queries.QUEUE_WEBHOOK, params).fetchone()
        rejected = worker.execute(intake_queries.RECORD_REJECTED, {"raw_body": "{", "error": "not JSON"}).fetchone()
    assert first is not None and first[2] is False
    assert again == (first[0], first[1], True)
    assert rejected is not None
    statuses = conn.execute("select status from flux_webhook_notifications order by status").fetchall()
    assert statuses == [("pending",), ("rejected",)]


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.usefixtures("no_public_execute")
def test_a_backfill_with_webhooks_runs_completely_under_the_least_privilege_role(
    db_url: str, worker_url: str, tmp_path: Path
) -> None:
    # Given a 300-thread mailbox whose webhooks reach the intake (as the owner, like the HTTP receiver would)
    nylas = start_in_thread(
        seed=21, grants=[GRANT], threads_per_grant=300, emitter=SqlIntakeEmitter(db_url), large_body_share=0.0
    )
    try:
        backfill = queue_backfill(db_url, nylas, GRANT)
        # When the workers run as a login role that holds only nova_worker, without PUBLIC's EXECUTE on the service's
        # functions, while new mail arrives
        env = worker_env(worker_url, nylas)
        with running_workers(env, tmp_path / "workers.log", processes=1, threads=4) as workers:
            for _ in range(3):
                nylas.simulator.add_message(GRANT)  # message.created of a new conversation
            for message_id in list(nylas.simulator.grants[GRANT].messages)[:3]:
                nylas.simulator.update_message(GRANT, message_id, starred=True)  # message.updated

            def settled() -> bool:
                with psycopg.connect(db_url) as check:
                    row = check.execute(
                        "select count(*) from flux_webhook_notifications where status not in ('processed', 'ignored')"
                    ).fetchone()
                return backfill_status(db_url, backfill.config_id) == "completed" and row == (0,)

            wait_for(settled, timeout_s=180, interval_s=0.5, what="the backfill and the webhooks under nova_worker")
            wait_for(
                lambda: not run_problems(db_url, nylas, backfill, mail_arrived=True),
                timeout_s=20,
                what="an exact mirror",
            )
            with psycopg.connect(db_url) as check:
                # The workers' pools hold connections open: they are the least-privilege role's.
                sessions = check.execute(
                    "select count(*) from pg_stat_activity where usename = %s", [urlsplit(worker_url).username]
                ).fetchone()
            log = workers.log()
        # Then everything was done, exactly, and no statement was refused
        assert run_problems(db_url, nylas, backfill, mail_arrived=True) == []
        with psycopg.connect(db_url) as check:
            processed = check.execute(
                "select count(*) from flux_webhook_notifications where status = 'processed'"
            ).fetchone()
        assert processed is not None and processed[0] >= 5
        assert sessions is not None and sessions[0] >= 1, "the workers did not use the least-privilege role"
        assert "permission denied" not in log, log[-3000:]
        assert "InsufficientPrivilege" not in log
    finally:
        nylas.stop()
