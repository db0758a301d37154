"""Constraints of the service's tables: documented status values only, per-inbox uniqueness, updated_at."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from .conftest import Inbox


def test_an_inbox_status_of_the_applications_own_is_accepted(conn: psycopg.Connection) -> None:
    # Inboxes are created by the application that connects them; the original's writers used their own words.
    conn.execute(
        "insert into flux_inboxes (nylas_grant_id, status, webhook_health_status) values ('g-own', 'connected', 'unknown')"
    )
    assert conn.execute("select status from flux_inboxes where nylas_grant_id = 'g-own'").fetchone() == ("connected",)


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "insert into flux_inbox_configurations (inbox_id, backfill_status) values (%(inbox)s, 'queued')",
            "flux_inbox_configurations_backfill_status_check",
        ),
        (
            "insert into flux_inbox_configurations (inbox_id, backfill_progress) values (%(inbox)s, '[]')",
            "flux_inbox_configurations_backfill_progress_check",
        ),
        (
            "insert into flux_webhook_notifications (webhook_id, notification_type, status)"
            " values ('w1', 'message.created', 'done')",
            "flux_webhook_notifications_status_check",
        ),
        (
            "insert into queued_threads (config_id, inbox_id, nylas_thread_id, status)"
            " values (%(config)s, %(inbox)s, 't1', 'pending')",
            "queued_threads_status_check",
        ),
    ],
    ids=[
        "config-backfill-status",
        "config-progress-not-object",
        "webhook-status",
        "queued-thread-status",
    ],
)
def test_undocumented_values_are_rejected_by_a_named_check_constraint(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID, statement: str, constraint: str
) -> None:
    with pytest.raises(errors.CheckViolation) as caught:
        conn.execute(statement, {"inbox": inbox.id, "config": config_id})
    assert caught.value.diag.constraint_name == constraint


def test_the_same_nylas_thread_id_may_exist_once_per_inbox(
    conn: psycopg.Connection, make_inbox: Callable[..., Inbox]
) -> None:
    first, second = make_inbox(), make_inbox()
    insert = "insert into flux_email_threads (inbox_id, nylas_thread_id) values (%s, 'thr_1') returning id"
    conn.execute(insert, (first.id,))
    conn.execute(insert, (second.id,))
    with pytest.raises(errors.UniqueViolation) as caught:
        conn.execute(insert, (first.id,))
    assert caught.value.diag.constraint_name == "flux_email_threads_inbox_id_nylas_thread_id_key"


def test_messages_are_unique_per_inbox_and_belong_to_a_thread(conn: psycopg.Connection, inbox: Inbox) -> None:
    thread = conn.execute(
        "insert into flux_email_threads (inbox_id, nylas_thread_id) values (%s, 'thr_1') returning id", (inbox.id,)
    ).fetchone()
    assert thread is not None
    insert = "insert into flux_email_messages (thread_id, inbox_id, nylas_message_id) values (%s, %s, 'msg_1')"
    conn.execute(insert, (thread[0], inbox.id))
    with pytest.raises(errors.UniqueViolation):
        conn.execute(insert, (thread[0], inbox.id))
    with pytest.raises(errors.ForeignKeyViolation):
        conn.execute(insert.replace("msg_1", "msg_2"), (uuid.uuid4(), inbox.id))
    row = conn.execute(
        "select unread, to_recipients, headers, attachments from flux_email_messages where nylas_message_id = 'msg_1'"
    ).fetchone()
    assert row == (True, [], [], [])


def test_one_configuration_per_inbox(conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID) -> None:
    with pytest.raises(errors.UniqueViolation):
        conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s)", (inbox.id,))


def test_updated_at_moves_on_update_and_created_at_does_not(conn: psycopg.Connection, inbox: Inbox) -> None:
    # The trigger stamps now(), the transaction time, so two separate transactions are needed to see it move.
    before = conn.execute("select created_at, updated_at from flux_inboxes where id = %s", (inbox.id,)).fetchone()
    conn.execute("update flux_inboxes set status = 'auth_expired' where id = %s", (inbox.id,))
    after = conn.execute("select created_at, updated_at from flux_inboxes where id = %s", (inbox.id,)).fetchone()
    assert before is not None and after is not None
    assert after[0] == before[0]
    assert after[1] > before[1]


def test_queued_thread_id_always_equals_the_nylas_thread_id(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, nylas_thread_id) values (%s, %s, 'thr_9')",
        (config_id, inbox.id),
    )
    assert conn.execute("select thread_id from queued_threads").fetchone() == ("thr_9",)
    # The original's writers set thread_id themselves, alone or next to nylas_thread_id: the Nylas id wins.
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, thread_id) values (%s, %s, 'only')", (config_id, inbox.id)
    )
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, nylas_thread_id, thread_id) values (%s, %s, 'a', 'b')",
        (config_id, inbox.id),
    )
    conn.execute("update queued_threads set nylas_thread_id = 'thr_10' where nylas_thread_id = 'thr_9'")
    pairs = conn.execute("select nylas_thread_id, thread_id from queued_threads order by 1").fetchall()
    assert pairs == [("a", "a"), ("only", "only"), ("thr_10", "thr_10")]


def test_deleting_an_inbox_removes_everything_that_hangs_off_it(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute("select insert_queued_thread_idempotent(%s, %s, 'thr_1', %s)", (config_id, inbox.id, inbox.grant_id))
    conn.execute("select initialize_sync_stats(%s)", (config_id,))
    conn.execute("delete from flux_inboxes where id = %s", (inbox.id,))
    for table in ("flux_inbox_configurations", "queued_threads", "inbox_sync_stats"):
        count = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(table))).fetchone()
        assert count == (0,), table


def test_every_function_of_these_migrations_says_what_it_does(conn: psycopg.Connection) -> None:
    sql_dir = Path(__file__).resolve().parents[2] / "nova_email" / "sql"
    names = {
        match.group(1)
        for path in sorted(sql_dir.glob("00[1-7]_*.sql"))
        for match in re.finditer(r"CREATE OR REPLACE FUNCTION (\w+)\(", path.read_text())
    }
    assert len(names) >= 20
    rows = conn.execute(
        "select p.proname, obj_description(p.oid, 'pg_proc') from pg_proc p"
        " where p.pronamespace = 'public'::regnamespace and p.proname = any(%s)",
        (sorted(names),),
    ).fetchall()
    assert {name for name, _ in rows} == names
    assert [name for name, comment in rows if not comment] == []


def test_the_migrations_pause_triggers_in_one_place() -> None:
    sql_dir = Path(__file__).resolve().parents[2] / "nova_email" / "sql"
    pausing = [path.name for path in sorted(sql_dir.glob("*.sql")) if "DISABLE TRIGGER" in path.read_text()]
    assert pausing == ["059_paused_triggers.sql"]


def test_paused_triggers_leave_updated_at_alone_and_resume_unless_dropped(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    before = conn.execute("select updated_at from flux_inboxes where id = %s", [inbox.id]).fetchone()
    with conn.transaction():
        paused = conn.execute("select * from flux_pause_triggers(array['flux_inboxes', 'no_such_table'])").fetchall()
        conn.execute("update flux_inboxes set email = 'paused@example.com' where id = %s", [inbox.id])
        for table, trigger in paused:
            conn.execute("select flux_resume_trigger(%s, %s)", [table, trigger])
    assert paused and all(table == "flux_inboxes" for table, _ in paused)
    assert conn.execute("select updated_at from flux_inboxes where id = %s", [inbox.id]).fetchone() == before
    enabled = conn.execute(
        "select count(*) from pg_trigger where tgrelid = 'flux_inboxes'::regclass and not tgisinternal"
        " and tgenabled = 'D'"
    ).fetchone()
    assert enabled == (0,)
    # A trigger dropped while paused is not looked for again
    conn.execute("select flux_resume_trigger('flux_inboxes', 'gone')")
