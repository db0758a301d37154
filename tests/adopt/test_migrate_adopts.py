"""`nova-email migrate` on a database the original wrote: upgraded in place, every row kept, safe to repeat."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from brokers import schema
from brokers.errors import MigrationError
from nova_email.migrate import SQL_DIR, migrate, needs_adoption, plan
from tests.adopt.conftest import TABLES, logged_warnings
from tests.conftest import ROOT

#: Rows of original_data.sql.
INBOX = "11111111-0000-4000-8000-000000000001"
OTHER_INBOX = "11111111-0000-4000-8000-000000000002"
CONFIG = "22222222-0000-4000-8000-000000000001"
OTHER_CONFIG = "22222222-0000-4000-8000-000000000002"
#: Every object in the schemas the migrations touch, as (kind and name, definition), functions with their bodies.
CATALOG = """
select 'column ' || a.attrelid::regclass::text || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || case when a.attnotnull then ' not null' else '' end
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
  from pg_attribute a join pg_class c on c.oid = a.attrelid
  left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
 where c.relnamespace::regnamespace::text in ('public', 'pgmq', 'pgmq_broker') and c.relkind in ('r', 'p')
   and a.attnum > 0 and not a.attisdropped
union all
select 'constraint ' || conrelid::regclass::text || ' ' || pg_get_constraintdef(oid), ''
  from pg_constraint where connamespace::regnamespace::text in ('public', 'pgmq', 'pgmq_broker') and conrelid <> 0
union all
select 'index ' || indexrelid::regclass::text, pg_get_indexdef(indexrelid)
  from pg_index i join pg_class c on c.oid = i.indexrelid
 where c.relnamespace::regnamespace::text in ('public', 'pgmq', 'pgmq_broker')
union all
select 'function ' || p.oid::regprocedure::text, pg_get_function_result(p.oid) || ' ' || md5(p.prosrc)
  from pg_proc p where p.pronamespace::regnamespace::text in ('public', 'pgmq_broker')
union all
select 'trigger ' || tgrelid::regclass::text || '.' || tgname, pg_get_triggerdef(oid)
  from pg_trigger where not tgisinternal
"""


def catalog(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute(CATALOG).fetchall())  # type: ignore[arg-type]


def rows(conn: psycopg.Connection) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row of the seven tables as JSON, by table and primary key."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for table, key in TABLES.items():
            # Table and key names come from the TABLES constant, not from input.
            query = f"select {key}::text as key, to_jsonb(t) as row from {table} t"  # noqa: S608
            result[table] = {r["key"]: r["row"] for r in cur.execute(query.encode())}
    return result


def queue_messages(conn: psycopg.Connection) -> list[tuple[str, int, dict[str, Any]]]:
    found = []
    for queue in ("nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs"):
        for msg_id, message in conn.execute("select msg_id, message from pgmq.read(%s, 0, 100)", [queue]):
            found.append((queue, msg_id, message))
    return found


def test_migrate_adopts_the_original_database_and_keeps_every_row(original: psycopg.Connection) -> None:
    # Given the original's database with its history, and jobs its producers left on the queues
    original.execute("select queue_thread_sync('thr_waiting', 'grant-adopt', %s, %s)", [INBOX, CONFIG])
    original.execute(
        "select queue_nylas_webhook_notification('wh-waiting', 'message.updated', 'grant-adopt', %s)",
        ['{"id": "wh-waiting", "type": "message.updated", "data": {"object": {"id": "msg_orig_1"}}}'],
    )
    before = rows(original)
    jobs_before = queue_messages(original)
    assert needs_adoption(original)

    # When it is migrated
    applied = migrate(original)

    # Then it was adopted, then migrated as usual
    assert applied[0] == "adopt_original" and "060_legacy_api" in applied
    after = rows(original)
    # And every row is still there with every value it had, but a configuration never backfilled, now 'pending'
    for table, table_rows in before.items():
        assert after[table].keys() == table_rows.keys(), table
        for key, row in table_rows.items():
            kept = {column: after[table][key][column] for column in row}
            expected = dict(row)
            if table == "flux_inbox_configurations" and row["backfill_status"] is None:
                expected["backfill_status"] = "pending"
            assert kept == expected, (table, key)
    # And the new columns have values taken from the rows they belong to
    messages = after["flux_email_messages"]
    threads = after["flux_email_threads"]
    for message in messages.values():
        thread = threads[message["thread_id"]]
        assert (message["inbox_id"], message["nylas_thread_id"]) == (thread["inbox_id"], thread["nylas_thread_id"])
    assert all(r["thread_id"] == r["nylas_thread_id"] for r in after["queued_threads"].values())
    # And the jobs on the queues are untouched, for our workers to take
    assert queue_messages(original) == jobs_before
    # And the inbox whose status is the application's own keeps it
    assert after["flux_inboxes"][str(OTHER_INBOX)]["status"] == "connected"


def test_a_second_migrate_changes_nothing(original: psycopg.Connection) -> None:
    migrate(original)
    before = (catalog(original), rows(original))

    assert migrate(original) == []
    assert plan(original).steps == []
    assert (catalog(original), rows(original)) == before


def test_dry_run_lists_the_changes_and_makes_none(original_url: str, original: psycopg.Connection) -> None:
    before = (catalog(original), rows(original))

    result = subprocess.run(
        [sys.executable, "-m", "nova_email.cli", "migrate", "--dry-run"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": original_url, "LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Would run: adopt_original, brokers/000_schema")
    assert "nova_email/061_legacy_writers" in lines[0]
    assert "+ column flux_email_messages.inbox_id: uuid not null" in lines
    assert "+ column inbox_sync_stats.backfill_status: text" in lines
    assert "- constraint flux_email_threads.flux_email_threads_nylas_thread_id_key" in lines
    assert "- trigger queued_threads.queued_threads_stats_trigger" in lines
    assert "rows of flux_email_messages: 3 updated" in lines
    assert "rows of flux_inbox_configurations: 1 updated" in lines
    assert (catalog(original), rows(original)) == before
    assert needs_adoption(original)


def test_rows_our_constraints_refuse_stop_the_migration_before_anything_changes(original: psycopg.Connection) -> None:
    # Given rows that break our keys: a second configuration for an inbox, a redelivered webhook recorded twice,
    # and a message without a thread (so without an inbox)
    extra_config = original.execute(
        "insert into flux_inbox_configurations (inbox_id) values (%s) returning id::text", [OTHER_INBOX]
    ).fetchone()[0]  # type: ignore[index]
    twice = [
        original.execute(
            "insert into flux_webhook_notifications (webhook_id, notification_type, status)"
            " values ('wh-twice', 'message.created', 'processed') returning id::text"
        ).fetchone()[0]  # type: ignore[index]
        for _ in range(2)
    ]
    orphan = original.execute(
        "insert into flux_email_messages (nylas_message_id) values ('msg_orphan') returning id::text"
    ).fetchone()[0]  # type: ignore[index]
    before = (catalog(original), rows(original))

    # When it is migrated, it stops with the rows to fix
    with pytest.raises(MigrationError) as info:
        migrate(original)

    message = str(info.value)
    assert "nothing was changed" in message
    assert "sharing an inbox (keep one configuration per inbox), 2 row(s): " in message
    assert extra_config in message and str(OTHER_CONFIG) in message
    assert all(row in message for row in twice)
    assert (
        f"flux_email_messages rows without a thread or nylas_message_id (delete them: their inbox is unknown), "
        f"1 row(s): {orphan}" in message
    )
    # And nothing changed, not even the broker's tables
    assert (catalog(original), rows(original)) == before
    assert schema.applied_checksums(original, "brokers") == {}

    # When the rows are fixed, it goes through
    original.execute("delete from flux_inbox_configurations where id = %s", [extra_config])
    original.execute("delete from flux_webhook_notifications where id = %s", [twice[1]])
    original.execute("delete from flux_email_messages where id = %s", [orphan])
    assert migrate(original)[0] == "adopt_original"


def test_an_adopted_database_has_every_object_a_new_one_has(
    original: psycopg.Connection, new_db: psycopg.Connection
) -> None:
    migrate(original)

    fresh, adopted = catalog(new_db), catalog(original)

    missing = {name: definition for name, definition in fresh.items() if adopted.get(name) != definition}
    assert missing == {}


def test_a_database_migrated_with_an_earlier_text_of_an_edited_migration_is_recorded_silently(
    new_db: psycopg.Connection,
) -> None:
    # Given a database that applied 001_tables.sql before it tolerated existing objects
    [tables] = [m for m in schema.load_migrations(SQL_DIR) if m.name == "tables"]
    [earlier] = tables.replaces
    new_db.execute(
        "update pgmq_broker.schema_migrations set checksum = %s where namespace = 'nova_email' and version = 1",
        [earlier],
    )
    # When it is migrated again
    with logged_warnings() as warnings:
        applied = migrate(new_db)

    # Then nothing runs, nothing is warned about, and the record names the current text
    assert applied == []
    assert warnings == []
    assert schema.applied_checksums(new_db, "nova_email")[1] == tables.checksum


def test_two_processes_migrating_the_original_at_once_adopt_it_once(original_url: str) -> None:
    results: list[list[str] | BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(original_url, autocommit=True) as conn:
                results.append(migrate(conn))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert all(isinstance(r, list) for r in results) and len(results) == 2, results
    assert sum(r.count("adopt_original") for r in results if isinstance(r, list)) == 1
    with psycopg.connect(original_url, autocommit=True) as conn:
        assert plan(conn).steps == []
        assert rows(conn)["flux_email_messages"].keys() == {
            "44444444-0000-4000-8000-000000000001",
            "44444444-0000-4000-8000-000000000002",
            "44444444-0000-4000-8000-000000000003",
        }


def test_the_dry_run_of_a_new_database_lists_every_migration(empty_url: str) -> None:
    with psycopg.connect(empty_url, autocommit=True) as conn:
        result = plan(conn)

        assert not result.tried
        assert result.steps[0] == "brokers/000_schema" and "nova_email/061_legacy_writers" in result.steps
        assert "adopt_original" not in result.steps
        assert result.lines()[1].startswith("PGMQ is not installed yet")
        assert conn.execute("select to_regclass('pgmq.meta') is null").fetchone() == (True,)


#: What PGMQ's 1.4 releases (which a Supabase project may still run) lack: its throttled insert notifications.
PGMQ_1_4_MISSING = (
    "drop function pgmq.enable_notify_insert(text, integer), pgmq.disable_notify_insert(text)",
    "drop function pgmq.list_notify_insert_throttles(), pgmq.update_notify_insert(text, integer)",
    "drop table pgmq.notify_insert_throttle",
)


def test_every_migration_and_the_brokers_notifications_work_on_a_pgmq_without_insert_notifications(
    original: psycopg.Connection,
) -> None:
    # Given PGMQ as its 1.4 releases ship it
    for statement in PGMQ_1_4_MISSING:
        original.execute(statement)  # type: ignore[arg-type]  # constants above

    # When the database is migrated (migration 042 turns the broker's notifications on for every queue)
    migrate(original)

    # Then every queue wakes workers through the broker's trigger, which can be turned off and on again
    triggers = original.execute(
        "select tgrelid::regclass::text from pg_trigger where tgname = 'pgmq_broker_notify_insert' order by 1"
    ).fetchall()
    assert ("pgmq.q_thread_sync_jobs",) in triggers and len(triggers) >= 4
    original.execute("select pgmq_broker.disable_notify('thread_sync_jobs')")
    original.execute("select pgmq_broker.enable_notify('thread_sync_jobs')")
    original.execute("select pgmq_broker.enable_notify('a_new_queue')")
    assert original.execute(
        "select count(*) from pg_trigger where tgname = 'pgmq_broker_notify_insert'"
    ).fetchone() == (len(triggers) + 1,)


def test_the_queues_migration_runs_on_a_pgmq_without_insert_notifications(original: psycopg.Connection) -> None:
    # Given PGMQ as its 1.4 releases ship it (Supabase may still run one): no throttled insert notifications
    for statement in PGMQ_1_4_MISSING:
        original.execute(statement)  # type: ignore[arg-type]  # constants above

    original.execute(SQL_DIR.joinpath("002_queues.sql").read_bytes())

    queues = original.execute("select queue_name from pgmq.meta order by 1").fetchall()
    assert {"nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs"} <= {q for (q,) in queues}
