"""The workers run under the least-privilege role ``nova_worker`` (sql/090_worker_role.sql) and still do all their work.

A login role that holds nothing but ``nova_worker`` runs a whole backfill with live webhooks through real dramatiq
processes; the result must equal the mailbox exactly. The same role must be refused everything the workers do not
need: DDL, TRUNCATE, other schemas, creating roles or databases.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors, sql

from nova_email.simulator.server import start_in_thread
from nova_email.simulator.webhooks import SqlIntakeEmitter
from tests.chaos.scenario import backfill_status, queue_backfill, run_problems, worker_env
from tests.processes import running_workers, wait_for

GRANT = "grant-least-privilege"


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


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
    ],
)
def test_the_worker_role_is_refused_what_workers_do_not_need(worker_url: str, statement: str) -> None:
    with psycopg.connect(worker_url, autocommit=True) as conn:
        with pytest.raises((errors.InsufficientPrivilege, errors.DependentObjectsStillExist)):
            conn.execute(statement)


def test_the_worker_role_may_use_the_queues_and_the_sql_api(worker_url: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(worker_url, autocommit=True) as worker:
        msg_id = worker.execute("select flux_pgmq_send('thread_sync_jobs', '{\"x\": 1}'::jsonb)").fetchone()
        assert msg_id is not None
        read = worker.execute("select msg_id from flux_pgmq_read('thread_sync_jobs', 30, 1)").fetchone()
        assert read == msg_id
        assert worker.execute("select flux_pgmq_delete('thread_sync_jobs', %s)", [msg_id[0]]).fetchone() == (True,)


@pytest.mark.slow
@pytest.mark.processes
def test_a_backfill_with_webhooks_runs_completely_under_the_least_privilege_role(
    db_url: str, worker_url: str, tmp_path: Path
) -> None:
    # Given a 300-thread mailbox whose webhooks reach the intake (as the owner, like the HTTP receiver would)
    nylas = start_in_thread(
        seed=21, grants=[GRANT], threads_per_grant=300, emitter=SqlIntakeEmitter(db_url), large_body_share=0.0
    )
    try:
        backfill = queue_backfill(db_url, nylas, GRANT)
        # When the workers run as a login role that holds only nova_worker, while new mail arrives
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

            wait_for(settled, timeout_s=80, interval_s=0.5, what="the backfill and the webhooks under nova_worker")
            wait_for(
                lambda: not run_problems(db_url, nylas, backfill, mail_arrived=True),
                timeout_s=20,
                what="an exact mirror",
            )
            log = workers.log()
        # Then everything was done, exactly, and no statement was refused
        assert run_problems(db_url, nylas, backfill, mail_arrived=True) == []
        with psycopg.connect(db_url) as check:
            processed = check.execute(
                "select count(*) from flux_webhook_notifications where status = 'processed'"
            ).fetchone()
        assert processed is not None and processed[0] >= 5
        assert f"{urlsplit(worker_url).username}:***@" in log, "the workers did not use the least-privilege role"
        assert "permission denied" not in log, log[-3000:]
        assert "InsufficientPrivilege" not in log
    finally:
        nylas.stop()
