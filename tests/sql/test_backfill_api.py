"""Backfill orchestration: queueing with the 1-year cap, thread bookkeeping, checkpoints, the gate, completion."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from nova_email.nylas.client import ONE_YEAR

from .conftest import Inbox, queue_messages, run_concurrently

UTC = dt.UTC
END = dt.datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
QUEUE_BACKFILL = "select config_id, msg_id from queue_inbox_backfill(%s, %s, %s, %s)"


def queue_backfill(
    conn: psycopg.Connection,
    inbox: Inbox,
    start: dt.datetime | None = None,
    end: dt.datetime | None = END,
    config_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, int]:
    row = conn.execute(QUEUE_BACKFILL, (inbox.id, config_id, start, end)).fetchone()
    assert row is not None
    return row[0], row[1]


def config_row(conn: psycopg.Connection, config_id: uuid.UUID) -> dict[str, Any]:
    cur = conn.execute("select * from flux_inbox_configurations where id = %s", (config_id,))
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def progress(conn: psycopg.Connection, config_id: uuid.UUID) -> dict[str, Any]:
    return dict(config_row(conn, config_id)["backfill_progress"])


# queue_inbox_backfill


def test_queueing_a_backfill_creates_the_configuration_and_sends_the_job(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    start = END - dt.timedelta(days=30)
    config_id, msg_id = queue_backfill(conn, inbox, start, END)

    config = config_row(conn, config_id)
    assert (config["inbox_id"], config["backfill_status"], config["backfill_msg_id"]) == (inbox.id, "pending", msg_id)
    assert (config["backfill_start_date"], config["backfill_end_date"]) == (start, END)
    [job] = queue_messages(conn, "inbox_backfill_jobs")
    assert job == {
        "inbox_id": str(inbox.id),
        "config_id": str(config_id),
        "grant_id": inbox.grant_id,
        "start_date": job["start_date"],
        "end_date": job["end_date"],
    }
    assert (dt.datetime.fromisoformat(job["start_date"]), dt.datetime.fromisoformat(job["end_date"])) == (start, END)


@pytest.mark.parametrize(
    ("start", "expected_start"),
    [
        (END - dt.timedelta(days=730), END - dt.timedelta(days=365)),
        (END - dt.timedelta(days=365, seconds=1), END - dt.timedelta(days=365)),
        (END - dt.timedelta(days=365), END - dt.timedelta(days=365)),
        (END - dt.timedelta(days=10), END - dt.timedelta(days=10)),
        (None, END - dt.timedelta(days=365)),
        (END, END),
    ],
    ids=["two-years", "a-second-over", "exactly-a-year", "ten-days", "no-start", "empty-window"],
)
def test_the_window_is_capped_at_365_days_back_from_its_end(
    conn: psycopg.Connection, inbox: Inbox, start: dt.datetime | None, expected_start: dt.datetime
) -> None:
    config_id, _ = queue_backfill(conn, inbox, start, END)
    [job] = queue_messages(conn, "inbox_backfill_jobs")
    assert dt.datetime.fromisoformat(job["start_date"]) == expected_start
    assert config_row(conn, config_id)["backfill_start_date"] == expected_start


def test_the_window_ends_now_by_default(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox, None, None)
    (now,) = conn.execute("select now()").fetchone() or (None,)
    config = config_row(conn, config_id)
    assert now is not None
    assert now - dt.timedelta(minutes=1) < config["backfill_end_date"] <= now
    assert config["backfill_end_date"] - config["backfill_start_date"] == dt.timedelta(days=365)


def test_a_window_that_starts_after_it_ends_is_refused(conn: psycopg.Connection, inbox: Inbox) -> None:
    with pytest.raises(errors.InvalidParameterValue, match="starts after it ends"):
        queue_backfill(conn, inbox, END + dt.timedelta(seconds=1), END)
    assert conn.execute("select count(*) from flux_inbox_configurations").fetchone() == (0,)
    assert queue_messages(conn, "inbox_backfill_jobs") == []


def test_unknown_inbox_or_foreign_config_is_refused(conn: psycopg.Connection, inbox: Inbox, make_inbox: Any) -> None:
    with pytest.raises(errors.NoDataFound, match="Inbox .* does not exist"):
        conn.execute(QUEUE_BACKFILL, (uuid.uuid4(), None, None, END))
    with pytest.raises(errors.NoDataFound, match="Configuration .* does not exist"):
        queue_backfill(conn, inbox, config_id=uuid.uuid4())
    other_config, _ = queue_backfill(conn, make_inbox())
    with pytest.raises(errors.InvalidParameterValue, match="belongs to inbox"):
        queue_backfill(conn, inbox, config_id=other_config)


@pytest.mark.parametrize("status", ["backfill", "thread_sync", "in_progress"])
def test_a_second_backfill_is_refused_while_one_is_active(conn: psycopg.Connection, inbox: Inbox, status: str) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("update flux_inbox_configurations set backfill_status = %s", (status,))
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="already active"):
        queue_backfill(conn, inbox)
    assert len(queue_messages(conn, "inbox_backfill_jobs")) == 1
    assert config_row(conn, config_id)["backfill_status"] == status


def test_a_pending_backfill_blocks_only_while_its_job_is_on_the_queue(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, msg_id = queue_backfill(conn, inbox)
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        queue_backfill(conn, inbox)
    # The job was lost (e.g. purged): the inbox must not stay blocked.
    conn.execute("select flux_pgmq_delete('inbox_backfill_jobs', %s)", (msg_id,))
    again, new_msg_id = queue_backfill(conn, inbox)
    assert (again, new_msg_id != msg_id) == (config_id, True)


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_finished_backfill_can_be_queued_again(conn: psycopg.Connection, inbox: Inbox, status: str) -> None:
    config_id, msg_id = queue_backfill(conn, inbox)
    conn.execute("select flux_pgmq_delete('inbox_backfill_jobs', %s)", (msg_id,))
    conn.execute(
        "update flux_inbox_configurations set backfill_status = %s, backfill_completed_at = now(),"
        " backfill_started_at = now()",
        (status,),
    )
    assert queue_backfill(conn, inbox)[0] == config_id
    config = config_row(conn, config_id)
    assert (config["backfill_status"], config["backfill_started_at"], config["backfill_completed_at"]) == (
        "pending",
        None,
        None,
    )


def test_concurrent_requests_for_one_inbox_queue_exactly_one_backfill(
    conn: psycopg.Connection, db_url: str, inbox: Inbox
) -> None:
    def request(worker: psycopg.Connection, _: int) -> str:
        try:
            worker.execute(QUEUE_BACKFILL, (inbox.id, None, None, END))
        except errors.ObjectNotInPrerequisiteState:
            return "refused"
        return "queued"

    assert sorted(run_concurrently(db_url, 4, request)) == ["queued", "refused", "refused", "refused"]
    assert conn.execute("select count(*) from flux_inbox_configurations").fetchone() == (1,)
    assert len(queue_messages(conn, "inbox_backfill_jobs")) == 1


def test_a_retry_over_the_same_window_keeps_the_checkpoint_and_a_new_window_drops_it(
    conn: psycopg.Connection, inbox: Inbox
) -> None:
    start = END - dt.timedelta(days=90)
    config_id, msg_id = queue_backfill(conn, inbox, start, END)
    conn.execute("select start_backfill_run(%s)", (config_id,))
    conn.execute("select update_backfill_orchestration_progress(%s, 200, 2, 'CURSOR-3')", (config_id,))
    conn.execute("select record_backfill_failure(%s, 'Nylas 500')", (config_id,))
    conn.execute("select flux_pgmq_delete('inbox_backfill_jobs', %s)", (msg_id,))

    queue_backfill(conn, inbox, start, END)
    kept = progress(conn, config_id)
    assert (kept["last_page_token"], kept["current_page"], kept["threads_queued"]) == ("CURSOR-3", 2, 200)
    conn.execute("update flux_inbox_configurations set backfill_status = 'failed'")

    queue_backfill(conn, inbox, start - dt.timedelta(days=1), END)
    dropped = progress(conn, config_id)
    assert not {"last_page_token", "current_page", "threads_queued"} & dropped.keys()
    assert (dropped["error"], len(dropped["errors"])) == ("Nylas 500", 1)


# Orchestration steps


def test_start_backfill_run_marks_it_running_and_returns_the_checkpoint(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select update_backfill_orchestration_progress(%s, 100, 1, 'CURSOR-2')", (config_id,))
    row = conn.execute("select start_backfill_run(%s)", (config_id,)).fetchone()
    assert row is not None
    assert (row[0]["last_page_token"], row[0]["current_page"]) == ("CURSOR-2", 1)
    config = config_row(conn, config_id)
    assert config["backfill_status"] == "backfill" and config["backfill_started_at"] is not None
    with pytest.raises(errors.NoDataFound):
        conn.execute("select start_backfill_run(%s)", (uuid.uuid4(),))


def test_checkpoints_merge_into_progress_and_never_wipe_error_history(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select record_backfill_failure(%s, 'first failure')", (config_id,))
    conn.execute("update flux_inbox_configurations set backfill_progress = backfill_progress || '{\"custom\": 1}'")

    conn.execute("select update_backfill_orchestration_progress(%s, 100, 1, 'CURSOR-2')", (config_id,))
    conn.execute("select update_backfill_orchestration_progress(%s, 150, 2)", (config_id,))

    saved = progress(conn, config_id)
    assert (saved["threads_queued"], saved["current_page"], saved["last_page_token"]) == (150, 2, "CURSOR-2")
    assert (saved["error"], saved["custom"], len(saved["errors"])) == ("first failure", 1, 1)
    assert "last_checkpoint_at" in saved and "failed_at" in saved


def test_failures_keep_the_checkpoint_and_the_last_twenty_errors(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select update_backfill_orchestration_progress(%s, 100, 1, 'CURSOR-2')", (config_id,))
    for attempt in range(25):
        conn.execute("select record_backfill_failure(%s, %s)", (config_id, f"failure {attempt}"))
    config = config_row(conn, config_id)
    saved = config["backfill_progress"]
    assert config["backfill_status"] == "failed"
    assert [e["error"] for e in saved["errors"]] == [f"failure {n}" for n in range(5, 25)]
    assert (saved["error"], saved["last_page_token"]) == ("failure 24", "CURSOR-2")


def test_clearing_the_checkpoint_keeps_a_summary_and_the_errors(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select record_backfill_failure(%s, 'oops')", (config_id,))
    conn.execute("select update_backfill_orchestration_progress(%s, 40, 3, 'CURSOR-4')", (config_id,))
    conn.execute("select clear_backfill_checkpoint(%s)", (config_id,))
    saved = progress(conn, config_id)
    assert not {"last_page_token", "current_page", "threads_queued", "last_checkpoint_at"} & saved.keys()
    assert (saved["last_run"]["threads_queued"], saved["last_run"]["current_page"]) == (40, 3)
    assert saved["error"] == "oops"


def test_transition_opens_the_gate_and_records_the_count(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select start_backfill_run(%s)", (config_id,))
    conn.execute("select transition_to_thread_sync(%s, 42)", (config_id,))
    config = config_row(conn, config_id)
    assert config["backfill_status"] == "thread_sync"
    assert config["backfill_progress"]["threads_queued"] == 42
    assert "transitioned_at" in config["backfill_progress"]

    conn.execute("select record_backfill_failure(%s, 'boom')", (config_id,))
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="has failed"):
        conn.execute("select transition_to_thread_sync(%s, 42)", (config_id,))


# queued_threads bookkeeping


INSERT_THREAD = "select insert_queued_thread_idempotent(%s, %s, %s, %s)"


def thread_row(conn: psycopg.Connection, config_id: uuid.UUID, thread: str) -> tuple[Any, ...]:
    row = conn.execute(
        "select status, grant_id, error_message, pgmq_queued_at is not null, msg_id, attempts"
        " from queued_threads where config_id = %s and nylas_thread_id = %s",
        (config_id, thread),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_thread_is_recorded_once_and_missing_grant_ids_are_filled(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    assert conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", None)).fetchone() == (True,)
    assert conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", inbox.grant_id)).fetchone() == (False,)
    assert thread_row(conn, config_id, "thr_1") == ("queued", inbox.grant_id, None, False, None, 0)
    with pytest.raises(errors.InvalidParameterValue, match="thread id is empty"):
        conn.execute(INSERT_THREAD, (config_id, inbox.id, "", inbox.grant_id))


@pytest.mark.parametrize("status", ["processing", "completed"])
def test_rediscovering_a_thread_in_flight_or_done_leaves_it_alone(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID, status: str
) -> None:
    conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", inbox.grant_id))
    conn.execute("update queued_threads set status = %s, messages_synced = 3", (status,))
    assert conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", "grant-other")).fetchone() == (False,)
    assert thread_row(conn, config_id, "thr_1")[:2] == (status, inbox.grant_id)


def test_rediscovering_a_failed_thread_queues_it_again(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", inbox.grant_id))
    conn.execute("select queue_thread_sync('thr_1', %s, %s, %s)", (inbox.grant_id, inbox.id, config_id))
    conn.execute("update queued_threads set status = 'failed', error_message = 'Nylas 500', attempts = 5")
    assert conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", inbox.grant_id)).fetchone() == (True,)
    assert thread_row(conn, config_id, "thr_1") == ("queued", inbox.grant_id, None, False, None, 5)


def test_concurrent_discovery_of_the_same_threads_inserts_each_once(
    conn: psycopg.Connection, db_url: str, inbox: Inbox, config_id: uuid.UUID
) -> None:
    # Given four orchestrators that discover the same 50 threads at once
    threads = [f"thr_{n}" for n in range(50)]

    def discover(worker: psycopg.Connection, _: int) -> int:
        return sum(
            bool((worker.execute(INSERT_THREAD, (config_id, inbox.id, t, inbox.grant_id)).fetchone() or [False])[0])
            for t in threads
        )

    # Then every thread was "new" for exactly one of them
    assert sum(run_concurrently(db_url, 4, discover)) == 50
    assert conn.execute("select count(*) from queued_threads").fetchone() == (50,)


def test_queue_thread_sync_sends_the_job_and_stamps_the_row(
    conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute(INSERT_THREAD, (config_id, inbox.id, "thr_1", None))
    row = conn.execute("select queue_thread_sync('thr_1', null, %s, %s)", (inbox.id, config_id)).fetchone()
    assert row is not None
    [job] = queue_messages(conn, "thread_sync_jobs")
    # The grant comes from the inbox when neither the caller nor the row has one.
    assert job == {
        "thread_id": "thr_1",
        "grant_id": inbox.grant_id,
        "inbox_id": str(inbox.id),
        "config_id": str(config_id),
    }
    assert thread_row(conn, config_id, "thr_1")[3:5] == (True, row[0])


def test_queue_thread_sync_without_a_tracking_row_still_sends(conn: psycopg.Connection, inbox: Inbox) -> None:
    conn.execute("select queue_thread_sync('thr_live', %s, %s, null)", (inbox.grant_id, inbox.id))
    [job] = queue_messages(conn, "thread_sync_jobs")
    assert (job["thread_id"], job["config_id"]) == ("thr_live", None)


def test_bulk_send_queues_each_unsent_thread_once(conn: psycopg.Connection, inbox: Inbox, config_id: uuid.UUID) -> None:
    for n in range(5):
        conn.execute(INSERT_THREAD, (config_id, inbox.id, f"thr_{n}", inbox.grant_id))
    conn.execute("select queue_thread_sync('thr_0', %s, %s, %s)", (inbox.grant_id, inbox.id, config_id))
    conn.execute("update queued_threads set status = 'completed' where nylas_thread_id = 'thr_1'")

    assert conn.execute("select queue_unsent_thread_syncs(%s, 2)", (config_id,)).fetchone() == (2,)
    assert conn.execute("select queue_unsent_thread_syncs(%s)", (config_id,)).fetchone() == (1,)
    assert conn.execute("select queue_unsent_thread_syncs()").fetchone() == (0,)
    sent = sorted(job["thread_id"] for job in queue_messages(conn, "thread_sync_jobs"))
    assert sent == ["thr_0", "thr_2", "thr_3", "thr_4"]


def test_concurrent_recoverers_never_send_a_thread_twice(
    conn: psycopg.Connection, db_url: str, inbox: Inbox, config_id: uuid.UUID
) -> None:
    conn.execute(
        "insert into queued_threads (config_id, inbox_id, nylas_thread_id, grant_id)"
        " select %s, %s, 'thr_' || n, %s from generate_series(1, 200) n",
        (config_id, inbox.id, inbox.grant_id),
    )

    def recover(worker: psycopg.Connection, _: int) -> int:
        total = 0
        while sent := (worker.execute("select queue_unsent_thread_syncs(null, 25)").fetchone() or [0])[0]:
            total += sent
        return total

    assert sum(run_concurrently(db_url, 4, recover)) == 200
    jobs = queue_messages(conn, "thread_sync_jobs")
    assert len(jobs) == len({job["thread_id"] for job in jobs}) == 200


# Completion


def test_completion_waits_for_every_thread_and_for_the_gate(conn: psycopg.Connection, inbox: Inbox) -> None:
    config_id, _ = queue_backfill(conn, inbox)
    conn.execute("select start_backfill_run(%s)", (config_id,))
    conn.execute("select initialize_sync_stats(%s)", (config_id,))
    for n in range(3):
        conn.execute(INSERT_THREAD, (config_id, inbox.id, f"thr_{n}", inbox.grant_id))
    conn.execute("update queued_threads set status = 'completed'")
    done = "select complete_backfill_if_done(%s)"

    # Still listing pages: never complete, even if every known thread is done.
    assert conn.execute(done, (config_id,)).fetchone() == (False,)
    conn.execute("select transition_to_thread_sync(%s, 3)", (config_id,))
    conn.execute("update queued_threads set status = 'processing' where nylas_thread_id = 'thr_0'")
    assert conn.execute(done, (config_id,)).fetchone() == (False,)
    conn.execute("update queued_threads set status = 'failed' where nylas_thread_id = 'thr_0'")
    assert conn.execute(done, (config_id,)).fetchone() == (True,)

    config = config_row(conn, config_id)
    assert (config["backfill_status"], config["backfill_completed_at"] is not None) == ("completed", True)
    stats = conn.execute("select sync_completed_at is not null from inbox_sync_stats").fetchone()
    assert stats == (True,)
    assert conn.execute(done, (config_id,)).fetchone() == (False,)


def test_a_thread_sync_config_with_no_threads_is_not_completed(conn: psycopg.Connection, config_id: uuid.UUID) -> None:
    assert conn.execute("select complete_backfill_if_done(%s)", (config_id,)).fetchone() == (False,)


def test_the_database_caps_backfills_at_the_window_the_nylas_client_caps_listings_at(conn: psycopg.Connection) -> None:
    (window,) = conn.execute("select backfill_window()").fetchone() or (None,)
    assert window == ONE_YEAR


def test_no_function_but_backfill_window_spells_the_window_out(conn: psycopg.Connection) -> None:
    spelled_out = conn.execute(
        """
        select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.prosrc ~ %s and p.proname <> 'backfill_window'
        """,
        [rf"\m{ONE_YEAR.days}\M"],
    ).fetchall()
    assert spelled_out == []
