"""The completion monitor and auto-recovery against a real database.

Backfills are set up through the SQL API exactly as the backfill processor drives it
(queue_inbox_backfill, start_backfill_run, record_backfill_page, finish_backfill_listing); thread
outcomes are then written the way thread-sync workers write them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from loguru import logger
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from nova_email import completion
from tests.nova_email.conftest import GRANT

# -- helpers ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every message logged during the test, as its bare text."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message).rstrip("\n")), format="{message}", level="DEBUG")
    yield lines
    logger.remove(sink)


def start_backfill(conn: psycopg.Connection, inbox_id: uuid.UUID, threads: int) -> uuid.UUID:
    """A backfill that has listed `threads` threads and is still in its listing phase ('backfill')."""
    row = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox_id]).fetchone()
    assert row is not None
    config_id: uuid.UUID = row[0]
    conn.execute("select start_backfill_run(%s)", [config_id])
    listed = [{"id": f"thr_{i:05d}"} for i in range(threads)]
    conn.execute("select * from record_backfill_page(%s, %s, null, 1)", [config_id, Jsonb(listed)])
    return config_id


def thread_sync_backfill(conn: psycopg.Connection, inbox_id: uuid.UUID, threads: int) -> uuid.UUID:
    """A backfill that has handed `threads` threads over to thread sync (jobs sent)."""
    config_id = start_backfill(conn, inbox_id, threads)
    conn.execute("select finish_backfill_listing(%s)", [config_id])
    return config_id


def finish_threads(
    conn: psycopg.Connection, config_id: uuid.UUID, status: str, count: int, *, messages: int = 0
) -> None:
    """Move `count` still-queued threads to `status`, as workers do (completed with a message count, or failed)."""
    conn.execute(
        """
        update queued_threads set status = %(status)s, messages_synced = %(messages)s,
            processed_at = case when %(status)s in ('completed', 'failed') then now() end,
            started_at = now()
        where id in (select id from queued_threads where config_id = %(config_id)s and status = 'queued'
                     order by nylas_thread_id limit %(count)s)
        """,
        {"status": status, "messages": messages, "config_id": config_id, "count": count},
    )


def config_row(conn: psycopg.Connection, config_id: uuid.UUID) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select c.backfill_status, c.backfill_started_at, c.backfill_completed_at, s.sync_completed_at,"
            " s.threads_total, s.threads_queued, s.threads_processing, s.threads_completed, s.threads_failed,"
            " s.messages_synced, s.sync_started_at"
            " from flux_inbox_configurations c left join inbox_sync_stats s on s.config_id = c.id where c.id = %s",
            [config_id],
        ).fetchone()
    assert row is not None
    return row


def progress_of(seen: list[completion.BackfillProgress], config_id: uuid.UUID) -> completion.BackfillProgress:
    return next(p for p in seen if p.config_id == config_id)


def thread_jobs(conn: psycopg.Connection) -> int:
    row = conn.execute("select count(*) from pgmq.q_thread_sync_jobs").fetchone()
    assert row is not None
    return int(row[0])


# -- progress --------------------------------------------------------------------------------------------------------


def test_progress_is_counted_by_status_and_logged_in_the_original_line_format(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # Given 200 threads: 100 completed (3 messages each), 50 failed, 20 processing, 30 still queued
    config_id = thread_sync_backfill(conn, inbox_id, 200)
    finish_threads(conn, config_id, "completed", 100, messages=3)
    finish_threads(conn, config_id, "failed", 50)
    finish_threads(conn, config_id, "processing", 20)

    # When the monitor ticks
    seen = completion.check_backfills(conn)

    # Then it reports every count and the original's progress line, and leaves the config open
    progress = progress_of(seen, config_id)
    counts = (progress.total, progress.queued, progress.processing, progress.completed, progress.failed)
    assert counts == (200, 30, 20, 100, 50)
    assert progress.messages_synced == 300 and progress.status == "thread_sync" and not progress.just_completed
    assert f"Config {str(config_id)[:8]}... | Status: thread_sync | Progress: 75% (150/200)" in logged
    assert config_row(conn, config_id)["backfill_status"] == "thread_sync"


@pytest.mark.parametrize(
    ("done", "total", "shown"),
    [(1, 8, 13), (5, 8, 63), (1, 3, 33), (2, 3, 67), (0, 5, 0)],
    ids=lambda v: str(v),
)
def test_the_percentage_rounds_half_up_like_the_original(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str], done: int, total: int, shown: int
) -> None:
    # The original printed Math.round(done / total * 100): 12.5 shows as 13, not banker's 12.
    config_id = thread_sync_backfill(conn, inbox_id, total)
    finish_threads(conn, config_id, "completed", done)
    progress_of(completion.check_backfills(conn), config_id)
    assert f"Config {str(config_id)[:8]}... | Status: thread_sync | Progress: {shown}% ({done}/{total})" in logged


def test_nothing_is_active_nothing_is_logged(conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]) -> None:
    conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s)", [inbox_id])  # pending, never run
    assert completion.check_backfills(conn) == []
    assert logged == []


# -- completion ------------------------------------------------------------------------------------------------------


def test_a_backfill_whose_threads_are_all_terminal_is_completed_with_timestamps(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # Given a backfill whose threads all ended, some of them failed
    config_id = thread_sync_backfill(conn, inbox_id, 4)
    finish_threads(conn, config_id, "completed", 3, messages=2)
    finish_threads(conn, config_id, "failed", 1)

    # When the monitor ticks
    progress = progress_of(completion.check_backfills(conn), config_id)

    # Then the configuration and its stats are completed with timestamps, and the monitor says so
    assert progress.just_completed and progress.status == "completed"
    row = config_row(conn, config_id)
    assert row["backfill_status"] == "completed"
    assert row["backfill_completed_at"] is not None and row["backfill_completed_at"] >= row["backfill_started_at"]
    assert row["sync_completed_at"] is not None
    assert f"Config {str(config_id)[:8]}... | Status: completed | Progress: 100% (4/4)" in logged
    assert f"Config {str(config_id)[:8]}... completed: 3 threads, 6 messages" in logged
    # And it is no longer active on the next tick
    assert completion.check_backfills(conn) == []


def test_a_backfill_is_completed_only_once_its_last_thread_ends(conn: psycopg.Connection, inbox_id: uuid.UUID) -> None:
    config_id = thread_sync_backfill(conn, inbox_id, 3)
    finish_threads(conn, config_id, "completed", 2)
    finish_threads(conn, config_id, "processing", 1)

    assert not progress_of(completion.check_backfills(conn), config_id).just_completed
    assert config_row(conn, config_id)["backfill_status"] == "thread_sync"

    conn.execute("update queued_threads set status = 'completed' where config_id = %s", [config_id])
    assert progress_of(completion.check_backfills(conn), config_id).just_completed
    assert config_row(conn, config_id)["backfill_status"] == "completed"


def test_a_backfill_still_listing_pages_is_never_completed(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # Given a backfill in its listing phase whose threads listed so far have all ended
    config_id = start_backfill(conn, inbox_id, 2)
    finish_threads(conn, config_id, "completed", 2)

    progress = progress_of(completion.check_backfills(conn), config_id)

    # Then it stays in 'backfill': more pages may still bring threads
    assert not progress.just_completed
    row = config_row(conn, config_id)
    assert row["backfill_status"] == "backfill" and row["backfill_completed_at"] is None
    assert f"Config {str(config_id)[:8]}... | Status: backfill | Progress: 100% (2/2)" in logged


def test_a_legacy_in_progress_backfill_is_completed_too(conn: psycopg.Connection, inbox_id: uuid.UUID) -> None:
    config_id = thread_sync_backfill(conn, inbox_id, 2)
    conn.execute("update flux_inbox_configurations set backfill_status = 'in_progress' where id = %s", [config_id])
    finish_threads(conn, config_id, "completed", 2)
    assert progress_of(completion.check_backfills(conn), config_id).just_completed
    assert config_row(conn, config_id)["backfill_status"] == "completed"


def wait_until_blocked(conn: psycopg.Connection, pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = conn.execute("select wait_event_type from pg_stat_activity where pid = %s", [pid]).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.01)  # polling a condition against a deadline
    pytest.fail(f"backend {pid} never waited for a lock")


def test_completion_is_decided_again_under_the_row_lock(
    db_url: str, conn: psycopg.Connection, inbox_id: uuid.UUID
) -> None:
    # Given a backfill whose threads have all ended, as the monitor's first reading will see it
    config_id = thread_sync_backfill(conn, inbox_id, 2)
    finish_threads(conn, config_id, "completed", 2)
    # and another transaction, holding the configuration's lock, that adds a queued thread
    other = psycopg.connect(db_url)
    other.execute("select 1 from flux_inbox_configurations where id = %s for update", [config_id])
    other.execute("select insert_queued_thread_idempotent(%s, %s, 'thr_late', %s)", [config_id, inbox_id, GRANT])

    # When the monitor ticks on its own connection while that transaction commits
    with psycopg.connect(db_url, autocommit=True) as monitor:
        seen: list[completion.BackfillProgress] = []
        tick = threading.Thread(target=lambda: seen.extend(completion.check_backfills(monitor)))
        tick.start()
        try:
            wait_until_blocked(conn, monitor.info.backend_pid)
            other.commit()
        finally:
            other.close()
            tick.join(30)

    # Then the second check, under the lock, sees the new thread and the backfill stays open
    assert not progress_of(seen, config_id).just_completed
    assert config_row(conn, config_id)["backfill_status"] == "thread_sync"
    assert progress_of(completion.check_backfills(conn), config_id).queued == 1


def test_a_backfill_deleted_during_the_tick_does_not_stop_the_others(
    db_url: str, conn: psycopg.Connection, inbox_id: uuid.UUID
) -> None:
    # Given two finished backfills, the first of which another transaction is deleting
    doomed = thread_sync_backfill(conn, inbox_id, 1)
    finish_threads(conn, doomed, "completed", 1)
    second_inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('grant-2') returning id").fetchone()
    assert second_inbox is not None
    survivor = thread_sync_backfill(conn, second_inbox[0], 1)
    finish_threads(conn, survivor, "completed", 1)
    other = psycopg.connect(db_url)
    other.execute("delete from flux_inbox_configurations where id = %s", [doomed])

    # When the monitor ticks while the delete commits
    with psycopg.connect(db_url, autocommit=True) as monitor:
        seen: list[completion.BackfillProgress] = []
        tick = threading.Thread(target=lambda: seen.extend(completion.check_backfills(monitor)))
        tick.start()
        try:
            wait_until_blocked(conn, monitor.info.backend_pid)
            other.commit()
        finally:
            other.close()
            tick.join(30)

    # Then the deleted one is reported as seen but not completed, and the other is completed
    assert not progress_of(seen, doomed).just_completed
    assert progress_of(seen, survivor).just_completed
    assert config_row(conn, survivor)["backfill_status"] == "completed"


def test_drifted_counters_are_recomputed_and_completion_waits_for_them_to_agree(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # Given a finished backfill whose trigger-kept counters were damaged (e.g. a TRUNCATE elsewhere)
    config_id = thread_sync_backfill(conn, inbox_id, 3)
    finish_threads(conn, config_id, "completed", 3, messages=4)
    started = config_row(conn, config_id)["sync_started_at"]
    conn.execute(
        "update inbox_sync_stats set threads_completed = 0, threads_queued = 3, messages_synced = 1"
        " where config_id = %s",
        [config_id],
    )

    # When the monitor ticks, it reports the direct count, warns, repairs the counters and does not complete yet
    first = progress_of(completion.check_backfills(conn), config_id)
    assert (first.completed, first.queued, first.messages_synced, first.just_completed) == (3, 0, 12, False)
    assert any(line.startswith(f"Config {str(config_id)[:8]}... counters drifted") for line in logged)
    row = config_row(conn, config_id)
    # threads_queued counts the run's threads, not the ones waiting
    assert (row["threads_total"], row["threads_queued"], row["threads_completed"], row["messages_synced"]) == (
        3,
        3,
        3,
        12,
    )
    assert row["sync_started_at"] == started  # the run's start is kept

    # And on the next tick both readings agree and it completes
    assert progress_of(completion.check_backfills(conn), config_id).just_completed


# -- auto-recovery ---------------------------------------------------------------------------------------------------


def completed_backfill(conn: psycopg.Connection, inbox_id: uuid.UUID, threads: int) -> uuid.UUID:
    config_id = thread_sync_backfill(conn, inbox_id, threads)
    finish_threads(conn, config_id, "completed", threads)
    assert progress_of(completion.check_backfills(conn), config_id).just_completed
    return config_id


def test_a_completed_backfill_with_pending_threads_goes_back_to_thread_sync(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # Given a completed backfill that still has a thread never sent and a thread in flight
    config_id = completed_backfill(conn, inbox_id, 2)
    for thread_id in ("thr_unsent", "thr_in_flight"):
        conn.execute("select insert_queued_thread_idempotent(%s, %s, %s, %s)", [config_id, inbox_id, thread_id, GRANT])
    conn.execute("update queued_threads set status = 'processing' where nylas_thread_id = 'thr_in_flight'")
    jobs_before = thread_jobs(conn)

    # When recovery runs
    reopened = completion.recover_premature_completions(conn)

    # Then the configuration is back in thread_sync with its completion timestamps cleared
    assert reopened == [config_id]
    row = config_row(conn, config_id)
    assert (row["backfill_status"], row["backfill_completed_at"], row["sync_completed_at"]) == (
        "thread_sync",
        None,
        None,
    )
    # the unsent thread's job was sent (the one in flight already has its job), and a line says all that
    assert thread_jobs(conn) == jobs_before + 1
    sent = conn.execute("select pgmq_queued_at is not null from queued_threads where nylas_thread_id = 'thr_unsent'")
    assert sent.fetchone() == (True,)
    assert (
        f"Config {str(config_id)[:8]}... was marked completed with 2 threads pending; back to thread_sync "
        "(1 jobs re-sent)"
    ) in logged

    # And once those threads end, the monitor completes it again
    conn.execute("update queued_threads set status = 'completed' where config_id = %s", [config_id])
    assert progress_of(completion.check_backfills(conn), config_id).just_completed


def test_recovery_leaves_finished_never_started_and_running_backfills_alone(
    conn: psycopg.Connection, inbox_id: uuid.UUID, logged: list[str]
) -> None:
    # A completed backfill with nothing pending
    done = completed_backfill(conn, inbox_id, 2)
    # A completed configuration that never recorded a start (the original's guard), with a pending thread
    other_inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('grant-2') returning id").fetchone()
    assert other_inbox is not None
    unstarted = conn.execute(
        "insert into flux_inbox_configurations (inbox_id, backfill_status) values (%s, 'completed') returning id",
        [other_inbox[0]],
    ).fetchone()
    assert unstarted is not None
    conn.execute("select insert_queued_thread_idempotent(%s, %s, 'thr_1', 'grant-2')", [unstarted[0], other_inbox[0]])
    # A backfill still in thread sync
    third_inbox = conn.execute("insert into flux_inboxes (nylas_grant_id) values ('grant-3') returning id").fetchone()
    assert third_inbox is not None
    running = thread_sync_backfill(conn, third_inbox[0], 2)
    jobs_before = thread_jobs(conn)
    logged.clear()

    assert completion.recover_premature_completions(conn) == []

    assert config_row(conn, done)["backfill_status"] == "completed"
    assert config_row(conn, unstarted[0])["backfill_status"] == "completed"
    assert config_row(conn, running)["backfill_status"] == "thread_sync"
    assert thread_jobs(conn) == jobs_before and logged == []


def test_recovery_re_sends_every_unsent_thread_even_beyond_one_batch(
    conn: psycopg.Connection, inbox_id: uuid.UUID
) -> None:
    # Given a completed backfill to which 1,500 threads were added without ever being sent
    config_id = completed_backfill(conn, inbox_id, 1)
    conn.execute(
        "select insert_queued_thread_idempotent(%s, %s, 'thr_more_' || g, %s) from generate_series(1, 1500) g",
        [config_id, inbox_id, GRANT],
    )
    jobs_before = thread_jobs(conn)

    assert completion.recover_premature_completions(conn) == [config_id]

    assert thread_jobs(conn) == jobs_before + 1500
    unsent = conn.execute(
        "select count(*) from queued_threads where config_id = %s and pgmq_queued_at is null", [config_id]
    )
    assert unsent.fetchone() == (0,)
