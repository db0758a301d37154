"""Jobs the broker dead-letters before any actor runs (poison messages) still end their domain rows."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from brokers import PGMQBroker
from nova_email import completion, queries


def poison_and_consume(db_url: str, conn: psycopg.Connection, queue: str) -> None:
    """Make every message of `queue` look delivered too often, then let a real consumer of the broker fetch them."""
    conn.execute(f"update pgmq.q_{queue} set read_ct = 10")  # the queue name is one of ours, a literal
    broker = PGMQBroker(url=db_url, max_deliveries=5, poll_interval_ms=50)
    try:
        consumer = broker.consume(queue, prefetch=10, timeout=200)
        assert next(consumer) is None  # every fetched message was dead-lettered instead of delivered
        consumer.close()
    finally:
        broker.close()
    reasons = conn.execute("select reason from pgmq_broker.dead_letters where queue_name = %s", [queue]).fetchall()
    assert reasons and all(r == ("max_deliveries",) for r in reasons)


def test_a_poisoned_thread_job_fails_its_thread_and_lets_the_backfill_complete(
    db_url: str, conn: psycopg.Connection
) -> None:
    # Given a backfill in thread sync with one thread whose job kept killing its worker
    inbox_id = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('g-poison') returning id").fetchone()[0]  # type: ignore[index]
    config_id = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox_id]).fetchone()[0]  # type: ignore[index]
    conn.execute("select start_backfill_run(%s)", [config_id])
    conn.execute(
        "select * from record_backfill_page(%s, %s, null, 1)",
        [config_id, Jsonb([{"id": "thr_poison", "latest_message_received_date": 1_700_000_000}])],
    )
    conn.execute("select finish_backfill_listing(%s)", [config_id])
    conn.execute("update queued_threads set status = 'processing' where config_id = %s", [config_id])
    poison_and_consume(db_url, conn, "thread_sync_jobs")

    # When the completion monitor ticks
    completion.check_backfills(conn)

    # Then the thread failed with the dead letter's reason and the backfill completed
    row = conn.execute("select status, error_message from queued_threads where config_id = %s", [config_id]).fetchone()
    assert row is not None and row[0] == "failed" and "dead-lettered (max_deliveries)" in row[1]
    status = conn.execute("select backfill_status from flux_inbox_configurations where id = %s", [config_id])
    assert status.fetchone() == ("completed",)


def test_a_poisoned_webhook_job_marks_its_audit_row_error(db_url: str, conn: psycopg.Connection) -> None:
    notification_id: uuid.UUID = conn.execute(
        "select notification_id from queue_nylas_webhook_notification('ntf-poison', 'message.created', 'g', %s)",
        [Jsonb({"id": "ntf-poison", "type": "message.created", "data": {"object": {"id": "m1"}}})],
    ).fetchone()[0]  # type: ignore[index]
    poison_and_consume(db_url, conn, "nylas_webhook_notifications")

    assert completion.fail_dead_lettered_jobs(conn) == 1
    row = conn.execute("select status, error_message from flux_webhook_notifications where id = %s", [notification_id])
    status, error = row.fetchone()  # type: ignore[misc]
    assert status == "error" and "max_deliveries" in error
    # A second tick changes nothing more
    assert completion.fail_dead_lettered_jobs(conn) == 0


def test_malformed_dead_letters_beside_a_real_one_neither_fail_the_tick_nor_match_anything(
    db_url: str, conn: psycopg.Connection
) -> None:
    # Given dead letters whose bodies are anything at all, and one webhook job that was really lost
    notification_id = conn.execute(
        "select notification_id from queue_nylas_webhook_notification('ntf-lost', 'message.created', 'g', %s)",
        [Jsonb({"id": "ntf-lost", "type": "message.created", "data": {"object": {"id": "m1"}}})],
    ).fetchone()[0]  # type: ignore[index]
    poison_and_consume(db_url, conn, "nylas_webhook_notifications")
    for body in ["[]", '"text"', "null", '{"config_id": "not-a-uuid", "thread_id": "t"}', '{"notification_id": 7}']:
        for queue in ("thread_sync_jobs", "nylas_webhook_notifications"):
            conn.execute(
                "insert into pgmq_broker.dead_letters (queue_name, message, reason) values (%s, %s::jsonb, 'undecodable')",
                [queue, body],
            )

    # When the monitor reconciles, then only the real one is failed
    assert completion.fail_dead_lettered_jobs(conn) == 1
    row = conn.execute("select status from flux_webhook_notifications where id = %s", [notification_id]).fetchone()
    assert row == ("error",)


def test_the_dead_letter_scan_reads_only_the_unrecorded_ones_through_their_index(conn: psycopg.Connection) -> None:
    # Given many dead letters of jobs that failed in an actor (recorded by the actor itself)
    conn.execute(
        "insert into pgmq_broker.dead_letters (queue_name, message, reason)"
        " select 'thread_sync_jobs', jsonb_build_object('thread_id', 't' || i), 'failed' from generate_series(1, 20000) i"
    )
    conn.execute("analyze pgmq_broker.dead_letters")

    plan = "\n".join(r[0] for r in conn.execute("explain " + queries.FAIL_DEAD_LETTERED_THREADS))

    assert "dead_letters_unrecorded_idx" in plan, plan


def test_a_poisoned_backfill_job_fails_its_configuration_with_the_reason(db_url: str, conn: psycopg.Connection) -> None:
    # Given a backfill whose job kept killing its worker in the middle of the listing
    inbox_id = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('g-poison-bf') returning id").fetchone()[
        0
    ]  # type: ignore[index]
    config_id = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox_id]).fetchone()[0]  # type: ignore[index]
    conn.execute("select start_backfill_run(%s)", [config_id])
    poison_and_consume(db_url, conn, "inbox_backfill_jobs")

    # When the completion monitor ticks
    assert completion.fail_dead_lettered_jobs(conn) == 1

    # Then the configuration failed with the dead letter's reason, so a new backfill can be queued
    status, progress = conn.execute(
        "select backfill_status, backfill_progress from flux_inbox_configurations where id = %s", [config_id]
    ).fetchone()  # type: ignore[misc]
    assert status == "failed" and "dead-lettered (max_deliveries)" in progress["error"]
    assert completion.fail_dead_lettered_jobs(conn) == 0
    conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox_id])


def rows_read_from(plan: dict[str, Any], relation: str) -> int:
    """Rows the executed plan read from `relation`, over every node that scans it."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == relation else 0
    return int(own) + sum(rows_read_from(child, relation) for child in plan.get("Plans", []))


def test_the_backfill_sweep_reads_no_dead_letter_once_none_can_be_unrecorded(conn: psycopg.Connection) -> None:
    # Given backfill jobs that were poisoned long ago, whose configurations have long since ended
    inbox_id = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('g-old-bf') returning id").fetchone()[0]  # type: ignore[index]
    config_id = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox_id]).fetchone()[0]  # type: ignore[index]
    conn.execute(
        "insert into pgmq_broker.dead_letters (queue_name, message, reason)"
        " select 'inbox_backfill_jobs', jsonb_build_object('config_id', %s::text), 'max_deliveries'"
        " from generate_series(1, 200)",
        [config_id],
    )
    conn.execute("update flux_inbox_configurations set backfill_status = 'failed' where id = %s", [config_id])

    # When the monitor ticks with no backfill pending or listing
    [[[plan]]] = conn.execute("explain (analyze, format json) " + queries.FAIL_DEAD_LETTERED_BACKFILLS).fetchall()

    # Then it reads none of those dead letters again
    assert rows_read_from(plan["Plan"], "dead_letters") == 0
