"""The original's callers keep working, on a new database and on one adopted from the original.

Their receivers write webhook audit rows directly; their services call its SQL functions with the documented
signatures; their operators run the monitoring queries of its README.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from nova_email.migrate import migrate

#: The original README's monitoring queries, verbatim except the config id put where it says to.
README_QUERIES = {
    "check-sync-progress": "SELECT * FROM get_sync_progress('{config}');",
    "queue-metrics": """SELECT * FROM flux_pgmq_metrics('nylas_webhook_notifications');
SELECT * FROM flux_pgmq_metrics('inbox_backfill_jobs');
SELECT * FROM flux_pgmq_metrics('thread_sync_jobs');""",
    "monitor-active-syncs": """SELECT
  config_id,
  backfill_status,
  threads_queued,
  threads_completed,
  threads_processing,
  threads_failed,
  messages_synced,
  ROUND((threads_completed::NUMERIC / threads_queued) * 100, 2) as percent_complete
FROM inbox_sync_stats
WHERE sync_completed_at IS NULL;""",
    "recent-webhook-activity": """SELECT
  notification_type,
  status,
  COUNT(*),
  AVG(processing_duration_ms) as avg_duration_ms
FROM flux_webhook_notifications
WHERE received_at > NOW() - INTERVAL '1 hour'
GROUP BY notification_type, status;""",
    "failed-webhooks": """SELECT * FROM flux_webhook_notifications
WHERE status = 'error'
ORDER BY received_at DESC
LIMIT 10;""",
    "failed-threads": """SELECT * FROM queued_threads
WHERE status = 'failed'
ORDER BY processed_at DESC
LIMIT 10;""",
    "list-queues": "SELECT * FROM flux_pgmq_list_queues();",
    "webhook-errors": """SELECT error_message, COUNT(*)
FROM flux_webhook_notifications
WHERE status = 'error'
  AND received_at > NOW() - INTERVAL '24 hours'
GROUP BY error_message;""",
    "backfill-status": """SELECT
  backfill_status,
  backfill_started_at,
  backfill_progress
FROM flux_inbox_configurations
WHERE id = '{config}';""",
    "queued-threads-by-status": """SELECT status, COUNT(*)
FROM queued_threads
WHERE config_id = '{config}'
GROUP BY status;""",
}


@pytest.fixture(params=["new", "adopted"])
def database(request: pytest.FixtureRequest) -> Iterator[psycopg.Connection]:
    """A migrated database: the test run's new one, or the original's after `migrate`."""
    if request.param == "new":
        yield request.getfixturevalue("conn")
        return
    original: psycopg.Connection = request.getfixturevalue("original")
    migrate(original)
    yield original


@pytest.fixture
def inbox_and_config(database: psycopg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """A new inbox of grant 'grant-callers' with a configuration in thread_sync."""
    inbox = database.execute(
        "insert into flux_inboxes (nylas_grant_id) values ('grant-callers') returning id"
    ).fetchone()[0]  # type: ignore[index]
    config = database.execute(
        "insert into flux_inbox_configurations (inbox_id, backfill_status) values (%s, 'thread_sync') returning id",
        [inbox],
    ).fetchone()[0]  # type: ignore[index]
    return inbox, config


def queued(conn: psycopg.Connection, queue: str) -> list[tuple[int, dict[str, Any]]]:
    return conn.execute("select msg_id, message from pgmq.read(%s, 0, 100) order by msg_id", [queue]).fetchall()


def test_a_pending_row_inserted_by_another_receiver_is_queued_once(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, _ = inbox_and_config
    body = {"id": "wh-direct", "type": "message.created", "data": {"object": {"id": "m1", "grant_id": "grant-callers"}}}
    # Given a receiver that records the webhook as an audit row, as the original's architecture had it
    row_id = database.execute(
        "insert into flux_webhook_notifications (payload, status) values (%s, 'pending') returning id", [Jsonb(body)]
    ).fetchone()[0]  # type: ignore[index]
    # And the same webhook through the function, and a rejected body
    database.execute(
        "select * from queue_nylas_webhook_notification('wh-direct', 'message.created', null, %s)", [Jsonb(body)]
    )
    database.execute("select record_rejected_webhook('not json', 'bad body')")

    # Then exactly one job is queued, for that row, with everything the worker needs
    [(msg_id, message)] = queued(database, "nylas_webhook_notifications")[-1:]
    assert [m for _, m in queued(database, "nylas_webhook_notifications") if m["webhook_id"] == "wh-direct"] == [
        message
    ]
    assert message["notification_id"] == str(row_id)
    assert (message["notification_type"], message["grant_id"], message["inbox_id"]) == (
        "message.created",
        "grant-callers",
        str(inbox),
    )
    assert database.execute(
        "select msg_id, webhook_id from flux_webhook_notifications where id = %s", [row_id]
    ).fetchone() == (msg_id, "wh-direct")


def test_a_redelivered_webhook_inserted_again_is_skipped_and_queued_once(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    body = {"id": "wh-again", "type": "message.created", "data": {"object": {"id": "m1", "grant_id": "grant-callers"}}}
    insert = "insert into flux_webhook_notifications (payload, status) values (%s, 'pending')"
    # Nylas delivers at least once: the receiver records the same webhook twice
    assert database.execute(insert, [Jsonb(body)]).rowcount == 1
    assert database.execute(insert, [Jsonb(body)]).rowcount == 0

    assert database.execute(
        "select count(*) from flux_webhook_notifications where webhook_id = 'wh-again'"
    ).fetchone() == (1,)
    assert [m for _, m in queued(database, "nylas_webhook_notifications") if m["webhook_id"] == "wh-again"] != []
    assert len([m for _, m in queued(database, "nylas_webhook_notifications") if m["webhook_id"] == "wh-again"]) == 1


def test_a_webhook_row_without_an_id_is_recorded_rejected_and_a_queued_one_is_queued(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    nameless = database.execute(
        "insert into flux_webhook_notifications (payload, status) values (%s, 'pending') returning status, error_message",
        [Jsonb({"type": "message.created", "data": {}})],
    ).fetchone()
    assert nameless is not None and nameless[0] == "rejected" and "no webhook id" in nameless[1]

    body = {"id": "wh-queued", "type": "thread.replied", "data": {"object": {"grant_id": "grant-callers"}}}
    row = database.execute(
        "insert into flux_webhook_notifications (payload, status) values (%s, 'queued') returning status, msg_id",
        [Jsonb(body)],
    ).fetchone()
    assert row is not None and row[0] == "pending"
    assert [m["webhook_id"] for _, m in queued(database, "nylas_webhook_notifications")][-1:] == ["wh-queued"]


def test_queue_nylas_webhook_notification_keeps_its_four_argument_form(database: psycopg.Connection) -> None:
    body = Jsonb({"id": "wh-4", "type": "grant.expired", "data": {"object": {"grant_id": "g"}}})
    first = database.execute(
        "select * from queue_nylas_webhook_notification(p_webhook_id => 'wh-4', p_notification_type => 'grant.expired',"
        " p_grant_id => 'g', p_payload => %s)",
        [body],
    ).fetchone()
    again = database.execute(
        "select * from queue_nylas_webhook_notification('wh-4', 'grant.expired', 'g', %s)", [body]
    ).fetchone()

    assert first is not None and again is not None
    assert again == (first[0], first[1], True)
    assert [m["webhook_id"] for _, m in queued(database, "nylas_webhook_notifications")].count("wh-4") == 1


def test_the_originals_webhook_functions_read_and_acknowledge(database: psycopg.Connection) -> None:
    for webhook_id in ("wh-ok", "wh-bad"):
        database.execute(
            "select queue_nylas_webhook_notification(%s, 'message.updated', 'g', %s)",
            [webhook_id, Jsonb({"id": webhook_id})],
        )

    read = database.execute("select msg_id, read_ct, message from read_nylas_webhook_notifications(10, 0)").fetchall()
    jobs = {message["webhook_id"]: (msg_id, uuid.UUID(message["notification_id"])) for msg_id, _, message in read}
    assert {"wh-ok", "wh-bad"} <= jobs.keys()
    ok = database.execute("select acknowledge_webhook_notification(%s, %s, true, null)", jobs["wh-ok"]).fetchone()
    bad = database.execute(
        "select acknowledge_webhook_notification(%s, %s, false, 'Message ID missing')", jobs["wh-bad"]
    ).fetchone()

    assert ok == (True,) and bad == (True,)
    statuses = dict(database.execute("select webhook_id, status from flux_webhook_notifications").fetchall())
    assert (statuses["wh-ok"], statuses["wh-bad"]) == ("processed", "error")
    # A success leaves the queue; a failure stays there for its retry
    left = {m["webhook_id"] for _, m in queued(database, "nylas_webhook_notifications")}
    assert "wh-ok" not in left and "wh-bad" in left


def test_the_originals_backfill_and_thread_functions_keep_their_signatures(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, config = inbox_and_config
    for thread in ("thr_a", "thr_b"):
        database.execute("select insert_queued_thread_idempotent(%s, %s, %s, 'grant-callers')", [config, inbox, thread])
    # The old counter calls recount: the triggers already counted, nothing is counted twice
    database.execute("select increment_threads_queued(%s)", [config])
    database.execute("select start_thread_processing(%s)", [config])
    stats = "select threads_total, threads_queued, threads_completed, messages_synced from inbox_sync_stats where config_id = %s"
    assert database.execute(stats, [config]).fetchone() == (2, 2, 0, 0)

    jobs = [
        database.execute("select queue_thread_sync(%s, null, %s, %s)", [t, inbox, config]).fetchone()[0]
        for t in ("thr_a", "thr_b")
    ]  # type: ignore[index]
    assert database.execute("select acknowledge_thread_job(%s, %s, 3)", [jobs[0], config]).fetchone() == (True,)
    assert database.execute("select acknowledge_thread_job(%s, %s, 0, false)", [jobs[1], config]).fetchone() == (True,)

    assert database.execute(stats, [config]).fetchone() == (2, 2, 1, 3)
    assert queued(database, "thread_sync_jobs") == []
    assert database.execute(
        "select backfill_status from flux_inbox_configurations where id = %s", [config]
    ).fetchone() == ("completed",)

    backfill = database.execute("select msg_id from queue_inbox_backfill(%s)", [inbox]).fetchone()[0]  # type: ignore[index]
    assert database.execute("select acknowledge_backfill_job(%s, %s)", [backfill, config]).fetchone() == (True,)
    assert queued(database, "inbox_backfill_jobs") == []


def test_acknowledge_thread_job_finds_a_thread_queued_before_adoption_by_its_thread_id(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, config = inbox_and_config
    # Given a thread the original queued itself: its row knows no msg_id, its job carries the thread id
    database.execute(
        "insert into queued_threads (config_id, inbox_id, thread_id, grant_id, status) values (%s, %s, 'thr_old',"
        " 'grant-callers', 'processing')",
        [config, inbox],
    )
    job = {"thread_id": "thr_old", "grant_id": "grant-callers", "inbox_id": str(inbox), "config_id": str(config)}
    msg_id = database.execute("select pgmq.send('thread_sync_jobs', %s)", [Jsonb(job)]).fetchone()[0]  # type: ignore[index]

    assert database.execute("select acknowledge_thread_job(%s, %s, 5)", [msg_id, config]).fetchone() == (True,)

    assert database.execute(
        "select status, messages_synced from queued_threads where nylas_thread_id = 'thr_old'"
    ).fetchone() == ("completed", 5)


@pytest.mark.parametrize("name", list(README_QUERIES))
def test_every_monitoring_query_of_the_original_readme_runs(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID], name: str
) -> None:
    inbox, config = inbox_and_config
    for thread in ("thr_a", "thr_b"):
        database.execute("select insert_queued_thread_idempotent(%s, %s, %s, 'grant-callers')", [config, inbox, thread])
    database.execute(
        "update queued_threads set status = 'completed', messages_synced = 2 where nylas_thread_id = 'thr_a'"
    )

    with database.cursor() as cur:
        cur.execute(README_QUERIES[name].replace("{config}", str(config)).encode())
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())

    assert all(isinstance(result, list) for result in results)
    if name == "monitor-active-syncs":
        [active] = [row for row in results[0] if row[0] == config]
        # threads_queued counts the threads queued in the run, so the percentage is of the run: 1 of 2 done
        assert active[1:] == ("thread_sync", 2, 1, 0, 0, 2, 50)
    if name == "queue-metrics":
        assert [len(result) for result in results] == [1, 1, 1]


def monitor_active_syncs(database: psycopg.Connection, config: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = database.execute(README_QUERIES["monitor-active-syncs"].encode()).fetchall()
    return [row[1:] for row in rows if row[0] == config]


def test_monitor_active_syncs_reads_the_run_while_nothing_waits_and_drops_it_once_failed(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, config = inbox_and_config
    for thread in ("thr_a", "thr_b"):
        database.execute("select insert_queued_thread_idempotent(%s, %s, %s, 'grant-callers')", [config, inbox, thread])
    database.execute("select initialize_sync_stats(%s)", [config])
    # Mid-run with nothing waiting: one thread done, the last one being synced
    database.execute("update queued_threads set status = 'completed' where nylas_thread_id = 'thr_a'")
    database.execute("update queued_threads set status = 'processing' where nylas_thread_id = 'thr_b'")
    assert monitor_active_syncs(database, config) == [("thread_sync", 2, 1, 1, 0, 0, 50)]
    # The progress readers still see what waits right now
    assert database.execute(
        "select threads_total, threads_queued, threads_processing from get_sync_progress(%s)", [config]
    ).fetchone() == (2, 0, 1)

    # A failed run is over: its row leaves the active syncs
    database.execute("select record_backfill_failure(%s, 'grant revoked')", [config])
    assert monitor_active_syncs(database, config) == []


def test_a_run_that_finds_no_threads_is_over_for_monitor_active_syncs(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    _, config = inbox_and_config
    database.execute("update flux_inbox_configurations set backfill_status = 'backfill' where id = %s", [config])
    database.execute("insert into inbox_sync_stats (config_id) values (%s)", [config])
    database.execute("select finish_backfill_listing(%s)", [config])
    assert monitor_active_syncs(database, config) == []


@pytest.mark.parametrize("stats_row_before", [False, True], ids=["no-stats-row", "empty-stats-row-left-open"])
def test_monitor_active_syncs_runs_while_a_first_backfill_lists_its_first_page(
    database: psycopg.Connection, stats_row_before: bool
) -> None:
    # Given a new inbox's first backfill, its first slice started and nothing listed yet (and maybe a stats row
    # without threads that a caller of initialize_sync_stats left open)
    inbox = database.execute(
        "insert into flux_inboxes (nylas_grant_id) values ('grant-first') returning id"
    ).fetchone()[0]  # type: ignore[index]
    config = database.execute("select config_id from queue_inbox_backfill(%s)", [inbox]).fetchone()[0]  # type: ignore[index]
    if stats_row_before:
        database.execute("select initialize_sync_stats(%s)", [config])
    database.execute("select start_backfill_slice(%s)", [config])

    # Then the query runs and the run is not active yet: it has no threads to measure progress against
    assert monitor_active_syncs(database, config) == []

    # When the first page's threads are recorded, the run is active, with its start time
    for thread in ("thr_a", "thr_b"):
        database.execute("select insert_queued_thread_idempotent(%s, %s, %s, 'grant-first')", [config, inbox, thread])
    assert monitor_active_syncs(database, config) == [("backfill", 2, 0, 0, 0, 0, 0)]
    assert database.execute("select sync_started_at from get_sync_progress(%s)", [config]).fetchone() != (None,)


def test_inbox_sync_stats_backfill_status_follows_the_configuration(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, config = inbox_and_config
    database.execute("select initialize_sync_stats(%s)", [config])
    read = "select backfill_status from inbox_sync_stats where config_id = %s"
    assert database.execute(read, [config]).fetchone() == ("thread_sync",)

    database.execute("update flux_inbox_configurations set backfill_status = 'failed' where id = %s", [config])

    assert database.execute(read, [config]).fetchone() == ("failed",)


def test_threads_and_messages_without_subject_or_sender_read_as_the_original_wrote_them(
    database: psycopg.Connection, inbox_and_config: tuple[uuid.UUID, uuid.UUID]
) -> None:
    inbox, _ = inbox_and_config
    thread = database.execute("select upsert_nylas_thread(%s, %s)", [inbox, Jsonb({"id": "thr_bare"})]).fetchone()[0]  # type: ignore[index]
    database.execute(
        "select upsert_nylas_messages(%s, %s, %s)",
        [inbox, thread, Jsonb([{"id": "msg_bare", "thread_id": "thr_bare"}])],
    )

    assert database.execute("select subject, snippet from flux_email_threads where id = %s", [thread]).fetchone() == (
        "(No Subject)",
        "",
    )
    assert database.execute(
        "select subject, sender from flux_email_messages where nylas_message_id = 'msg_bare'"
    ).fetchone() == ("(No Subject)", {"email": "unknown@example.com"})
    # A row written without an unread flag (the original's writers) is unread.
    database.execute(
        "insert into flux_email_messages (thread_id, inbox_id, nylas_message_id) values (%s, %s, 'msg_direct')",
        [thread, inbox],
    )
    assert database.execute(
        "select unread from flux_email_messages where nylas_message_id = 'msg_direct'"
    ).fetchone() == (True,)
