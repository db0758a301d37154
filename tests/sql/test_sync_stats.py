"""inbox_sync_stats counters follow queued_threads through the triggers, also under concurrency."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Inbox, run_concurrently

STATUSES = ["queued", "processing", "completed", "failed"]


def counters(conn: psycopg.Connection, config_id: uuid.UUID) -> tuple[int, ...]:
    """(total, queued, processing, completed, failed, messages_synced) as the stats row holds them.

    The row's threads_queued counts the threads queued in the run (always threads_total); the threads waiting now
    are what get_sync_progress reports from the other counters.
    """
    row = conn.execute(
        "select threads_total, threads_queued from inbox_sync_stats where config_id = %s", (config_id,)
    ).fetchone()
    if row is None:
        return (0, 0, 0, 0, 0, 0)
    assert row[1] == row[0]
    progress = conn.execute(
        "select threads_total, threads_queued, threads_processing, threads_completed, threads_failed,"
        " messages_synced from get_sync_progress(%s)",
        (config_id,),
    ).fetchone()
    assert progress is not None
    return tuple(progress)


def recount(conn: psycopg.Connection, config_id: uuid.UUID) -> tuple[int, ...]:
    """The same numbers counted from queued_threads."""
    row = conn.execute("select * from get_backfill_stats(%s)", (config_id,)).fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


def add_threads(conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID, count: int, prefix: str = "thr") -> None:
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, nylas_thread_id, grant_id)"
        " select %s, %s, %s || '_' || n, %s from generate_series(1, %s) n",
        (config_id, inbox.id, prefix, inbox.grant_id, count),
    )


def set_status(conn: psycopg.Connection, thread: str, status: str, messages: int | None = None) -> None:
    conn.execute(
        "update queued_threads set status = %s, messages_synced = coalesce(%s, messages_synced)"
        " where nylas_thread_id = %s",
        (status, messages, thread),
    )


def test_counters_follow_a_mix_of_inserts_status_changes_and_deletes(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    add_threads(conn, inbox, config_id, 10)
    assert counters(conn, config_id) == (10, 10, 0, 0, 0, 0)

    for n in range(1, 7):
        set_status(conn, f"thr_{n}", "processing")
    set_status(conn, "thr_1", "completed", 4)
    set_status(conn, "thr_2", "completed", 2)
    set_status(conn, "thr_3", "failed")
    assert counters(conn, config_id) == (10, 4, 3, 2, 1, 6)

    # A worker that re-runs a completed thread and finds one more message.
    set_status(conn, "thr_2", "completed", 3)
    conn.execute("delete from queued_threads where nylas_thread_id in ('thr_1', 'thr_10')")
    assert counters(conn, config_id) == (8, 3, 3, 1, 1, 3)
    assert counters(conn, config_id) == recount(conn, config_id)


def test_updates_that_change_no_counted_column_leave_the_stats_row_untouched(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    add_threads(conn, inbox, config_id, 3)
    before = conn.execute("select xmin::text from inbox_sync_stats").fetchone()
    conn.execute("update queued_threads set pgmq_queued_at = now(), msg_id = 7, note = 'sent'")
    assert conn.execute("select xmin::text from inbox_sync_stats").fetchone() == before


def test_finishing_a_thread_stamps_last_thread_at(conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID) -> None:
    add_threads(conn, inbox, config_id, 2)
    set_status(conn, "thr_1", "processing")
    assert conn.execute("select last_thread_at from inbox_sync_stats").fetchone() == (None,)
    set_status(conn, "thr_1", "completed", 1)
    assert conn.execute("select last_thread_at is not null from inbox_sync_stats").fetchone() == (True,)


def test_one_statement_across_two_configs_and_a_move_between_them(
    conn: psycopg.Connection, make_inbox: Callable[..., Inbox]
) -> None:
    first, second = make_inbox(), make_inbox()
    configs = []
    for box in (first, second):
        row = conn.execute(
            "insert into flux_inbox_configurations (inbox_id) values (%s) returning id", (box.id,)
        ).fetchone()
        assert row is not None
        configs.append(row[0])
        add_threads(conn, box, row[0], 4, prefix=str(box.id))
    conn.execute(
        "update queued_threads set status = 'completed', messages_synced = 2 where nylas_thread_id like '%%_1'"
    )
    conn.execute("update queued_threads set config_id = %s where nylas_thread_id = %s", (configs[1], f"{first.id}_2"))
    for config in configs:
        assert counters(conn, config) == recount(conn, config)
    assert counters(conn, configs[1])[0] == 5


def test_initialize_sync_stats_recomputes_instead_of_zeroing(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    # Given a retried backfill: threads already tracked, and a stats row that drifted (or never existed)
    add_threads(conn, inbox, config_id, 5)
    set_status(conn, "thr_1", "completed", 9)
    conn.execute("update inbox_sync_stats set threads_total = 0, threads_queued = 0, sync_completed_at = now()")

    conn.execute("select initialize_sync_stats(%s, 0)", (config_id,))

    assert counters(conn, config_id) == (5, 4, 0, 1, 0, 9)
    row = conn.execute("select sync_started_at is not null, sync_completed_at from inbox_sync_stats").fetchone()
    assert row == (True, None)
    # and the triggers carry on from the recomputed values
    set_status(conn, "thr_2", "failed")
    assert counters(conn, config_id) == recount(conn, config_id)


def test_initialize_sync_stats_refuses_bad_arguments(conn: psycopg.Connection, config_id: uuid.UUID) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="threads_total must be >= 0"):
        conn.execute("select initialize_sync_stats(%s, -1)", (config_id,))
    with pytest.raises(psycopg.errors.NoDataFound, match="does not exist"):
        conn.execute("select initialize_sync_stats(%s)", (uuid.uuid4(),))


def test_counters_stay_exact_under_concurrent_workers_and_reinitialisation(
    conn: psycopg.Connection, db_url: str, inbox: Inbox, config_id: uuid.UUID
) -> None:
    # Given 200 queued threads and four thread workers taking them in turns, plus one worker that keeps
    # re-initialising the stats row (as a retried backfill would)
    add_threads(conn, inbox, config_id, 200)

    def work(worker: psycopg.Connection, index: int) -> None:
        if index == 4:
            for _ in range(30):
                worker.execute("select initialize_sync_stats(%s)", (config_id,))
            return
        for n in range(index + 1, 201, 4):
            thread = f"thr_{n}"
            set_status(worker, thread, "processing")
            with worker.transaction():
                final = "failed" if n % 7 == 0 else "completed"
                set_status(worker, thread, final, n % 5)

    run_concurrently(db_url, 5, work)

    # Then the counters equal a fresh count
    assert counters(conn, config_id) == recount(conn, config_id)
    assert counters(conn, config_id)[:5] == (200, 0, 0, 172, 28)


Operation = tuple[str, int, Any]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 9), st.sampled_from(STATUSES)),
        st.tuples(st.just("status"), st.integers(0, 9), st.sampled_from(STATUSES)),
        st.tuples(st.just("messages"), st.integers(0, 9), st.integers(0, 50)),
        st.tuples(st.just("delete"), st.integers(0, 9), st.none()),
        st.tuples(st.just("bulk_status"), st.integers(0, 9), st.sampled_from(STATUSES)),
        st.tuples(st.just("initialize"), st.just(0), st.none()),
    ),
    max_size=25,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_of_changes_keeps_counters_equal_to_a_recount(
    conn: psycopg.Connection, make_inbox: Callable[..., Inbox], ops: list[Operation]
) -> None:
    # Each example gets its own inbox and config, so examples do not see each other's rows.
    box = make_inbox()
    row = conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s) returning id", (box.id,))
    config_id = (row.fetchone() or [None])[0]
    for kind, n, value in ops:
        thread = f"thr_{n}"
        if kind == "insert":
            conn.execute(
                "insert into queued_threads (config_id, inbox_id, nylas_thread_id, status) values (%s, %s, %s, %s)"
                " on conflict do nothing",
                (config_id, box.id, thread, value),
            )
        elif kind == "status":
            conn.execute(
                "update queued_threads set status = %s where config_id = %s and nylas_thread_id = %s",
                (value, config_id, thread),
            )
        elif kind == "messages":
            conn.execute(
                "update queued_threads set messages_synced = %s where config_id = %s and nylas_thread_id = %s",
                (value, config_id, thread),
            )
        elif kind == "delete":
            conn.execute(
                "delete from queued_threads where config_id = %s and nylas_thread_id = %s", (config_id, thread)
            )
        elif kind == "bulk_status":
            conn.execute(
                "update queued_threads set status = %s where config_id = %s and nylas_thread_id >= %s",
                (value, config_id, thread),
            )
        else:
            conn.execute("select initialize_sync_stats(%s)", (config_id,))
        assert counters(conn, config_id) == recount(conn, config_id), (kind, n, value)
