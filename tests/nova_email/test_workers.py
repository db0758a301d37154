"""What only a running worker does, through real ``dramatiq nova_email.actors`` processes and the Nylas simulator.

The processors' tests call them directly. Here: Dramatiq's retries with each actor's ``max_retries`` (3 webhook,
3 backfill, 5 thread attempts), the give-up hook that leaves each domain row terminal before the job is
dead-lettered, rate-limit deferrals that use no attempt, and TESTING_MODE keeping processed webhooks on their queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from nova_email.simulator.server import SimulatorHandle, start_in_thread
from tests.chaos.scenario import SHORT_RETRY_WINDOWS_MS, worker_env
from tests.processes import Workers, running_workers, wait_for

GRANT = "grant-workers"
#: A second mailbox, for a backfill (an inbox has one configuration, and the first one's tracks a thread).
BACKFILL_GRANT = "grant-workers-backfill"

pytestmark = pytest.mark.processes


@pytest.fixture
def nylas() -> Iterator[SimulatorHandle]:
    handle = start_in_thread(seed=23, grants=[GRANT, BACKFILL_GRANT], threads_per_grant=5, large_body_share=0.0)
    yield handle
    handle.stop()


def make_inbox(conn: psycopg.Connection, grant_id: str) -> uuid.UUID:
    row = conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [grant_id]).fetchone()
    assert row is not None
    inbox_id: uuid.UUID = row[0]
    return inbox_id


def queue_new_message_webhook(conn: psycopg.Connection, nylas: SimulatorHandle) -> tuple[uuid.UUID, str]:
    """A new message in the mailbox, its message.created webhook queued through the SQL intake."""
    data = nylas.simulator.add_message(GRANT, thread_id=sorted(nylas.simulator.grants[GRANT].threads)[0])
    note = next(n for n in reversed(nylas.simulator.emitted) if n.type == "message.created")
    row = conn.execute(
        "select notification_id from queue_nylas_webhook_notification(%s, %s, %s, %s)",
        [note.id, note.type, note.grant_id, Jsonb(note.payload)],
    ).fetchone()
    assert row is not None
    return row[0], str(data["id"])


def queue_tracked_thread(conn: psycopg.Connection, inbox_id: uuid.UUID, thread_id: str) -> uuid.UUID:
    """A thread job whose queued_threads row a configuration tracks, as a backfill's fan-out leaves it."""
    row = conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s) returning id", [inbox_id])
    config_id: uuid.UUID = row.fetchone()[0]  # type: ignore[index]
    conn.execute("select insert_queued_thread_idempotent(%s, %s, %s, %s)", [config_id, inbox_id, thread_id, GRANT])
    conn.execute("select queue_thread_sync(%s, %s, %s, %s)", [thread_id, GRANT, inbox_id, config_id])
    return config_id


def audit_row(conn: psycopg.Connection, notification_id: uuid.UUID) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select status, attempts, error_message, processed_at, processing_duration_ms, msg_id"
            " from flux_webhook_notifications where id = %s",
            [notification_id],
        ).fetchone()
    assert row is not None
    return row


def dead_letters(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """The dead letters by queue (one job each in these tests)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "select queue_name, reason, error_type, error_message, attempts from pgmq_broker.dead_letters"
        ).fetchall()
    return {row["queue_name"]: row for row in rows}


def api_calls(nylas: SimulatorHandle, endpoint: str) -> int:
    return sum(n for (name, _), n in nylas.simulator.calls.snapshot().items() if name == endpoint)


def start_workers(db_url: str, nylas: SimulatorHandle, tmp_path: Path, **env: str) -> AbstractContextManager[Workers]:
    return running_workers(worker_env(db_url, nylas, POLL_INTERVAL_MS="100", **env), tmp_path / "workers.log")


@pytest.mark.slow
def test_after_the_last_attempt_each_row_is_terminal_and_the_job_dead_lettered_with_its_reason(
    db_url: str, conn: psycopg.Connection, nylas: SimulatorHandle, tmp_path: Path
) -> None:
    # Given a webhook, a tracked thread and a backfill, while every Nylas call fails with a 5xx (a 501, which the
    # client does not retry inside a call, so each attempt fails at once and only Dramatiq's retries remain)
    inbox_id = make_inbox(conn, GRANT)
    notification_id, _ = queue_new_message_webhook(conn, nylas)
    thread_id = sorted(nylas.simulator.grants[GRANT].threads)[1]
    config_id = queue_tracked_thread(conn, inbox_id, thread_id)
    backfill_inbox = make_inbox(conn, BACKFILL_GRANT)
    backfill_config = conn.execute("select config_id from queue_inbox_backfill(%s)", [backfill_inbox]).fetchone()
    assert backfill_config is not None
    nylas.faults.error_rate, nylas.faults.error_statuses = 1.0, (501,)

    # When the workers have run every job until they gave up, with retry windows longer than Dramatiq's backoffs
    # of the same actors without them (1 s and 2 s minimum: at most 6 s and 12 s for three attempts)
    windows_ms = {**SHORT_RETRY_WINDOWS_MS, "WEBHOOK_RETRY_WINDOW_MS": "8000", "BACKFILL_RETRY_WINDOW_MS": "13000"}
    with start_workers(db_url, nylas, tmp_path, **windows_ms) as workers:
        wait_for(
            lambda: len(dead_letters(conn)) == 3,
            timeout_s=60,
            interval_s=0.2,
            what=f"three dead letters; log:\n{workers.log()[-3000:]}",
        )

    # Then Nylas was asked exactly 3 / 5 / 3 times (a thread sync's first call is its message list)
    assert api_calls(nylas, "messages.get") == 3
    assert api_calls(nylas, "messages.list") == 5
    assert api_calls(nylas, "threads.get") == 0
    assert api_calls(nylas, "threads.list") == 3

    # And the webhook's audit row ended 'error' after 3 attempts, with the give-up reason
    audit = audit_row(conn, notification_id)
    assert (audit["status"], audit["attempts"]) == ("error", 3)
    assert audit["error_message"].startswith("gave up after 3 attempt(s): ServerError: Nylas failed on")
    assert audit["processed_at"] is not None

    # And the tracked thread ended 'failed' after 5 attempts, so its backfill can still complete
    thread = conn.execute(
        "select status, attempts, error_message from queued_threads where config_id = %s", [config_id]
    ).fetchone()
    assert thread is not None and thread[:2] == ("failed", 5)
    assert thread[2].startswith("gave up after 5 attempt(s): ServerError:")

    # And the backfill ended 'failed', its error kept in its progress
    backfill = conn.execute(
        "select backfill_status, backfill_progress ->> 'error' from flux_inbox_configurations where id = %s",
        [backfill_config[0]],
    ).fetchone()
    assert backfill is not None and backfill[0] == "failed"
    assert backfill[1].startswith("gave up after 3 attempt(s): ServerError:")

    # And each job's attempts were spread over its processor's retry window
    windows_s = {name.split("_")[0].lower(): int(ms) / 1000 for name, ms in windows_ms.items()}
    spans_s = conn.execute(
        "select (select extract(epoch from processed_at - received_at) from flux_webhook_notifications where id = %s),"
        " (select extract(epoch from processed_at - pgmq_queued_at) from queued_threads where config_id = %s),"
        " (select extract(epoch from (backfill_progress ->> 'failed_at')::timestamptz - backfill_requested_at)"
        "  from flux_inbox_configurations where id = %s)",
        [notification_id, config_id, backfill_config[0]],
    ).fetchone()
    assert spans_s is not None
    spans = dict(zip(("webhook", "thread", "backfill"), map(float, spans_s), strict=True))
    assert all(spans[name] >= windows_s[name] for name in spans), (spans, windows_s)

    # And each job was dead-lettered as failed, with the error and the attempts it had
    letters = dead_letters(conn)
    expected = {"nylas_webhook_notifications": 3, "thread_sync_jobs": 5, "inbox_backfill_jobs": 3}
    for queue, attempts in expected.items():
        letter = letters[queue]
        assert (letter["reason"], letter["error_type"], letter["attempts"]) == ("failed", "ServerError", attempts)
        assert "Nylas failed on" in letter["error_message"]


def test_an_invalid_thread_job_fails_its_tracked_thread_at_once_with_the_reason(
    db_url: str, conn: psycopg.Connection, nylas: SimulatorHandle, tmp_path: Path
) -> None:
    # Given a tracked thread whose job names an inbox that does not exist (a broken producer)
    inbox_id = make_inbox(conn, GRANT)
    thread_id = sorted(nylas.simulator.grants[GRANT].threads)[0]
    row = conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s) returning id", [inbox_id])
    config_id: uuid.UUID = row.fetchone()[0]  # type: ignore[index]
    conn.execute("select insert_queued_thread_idempotent(%s, %s, %s, %s)", [config_id, inbox_id, thread_id, GRANT])
    job = {"thread_id": thread_id, "inbox_id": str(uuid.uuid4()), "config_id": str(config_id)}
    conn.execute("select pgmq.send('thread_sync_jobs', %s)", [Jsonb(job)])

    # When the workers run it
    with start_workers(db_url, nylas, tmp_path):
        wait_for(lambda: "thread_sync_jobs" in dead_letters(conn), timeout_s=20, what="the dead letter")

    # Then it was not retried, and the give-up hook failed the tracked thread with the dead letter's reason
    letter = dead_letters(conn)["thread_sync_jobs"]
    assert (letter["reason"], letter["error_type"], letter["attempts"]) == ("failed", "InvalidJob", 1)
    thread = conn.execute("select status, error_message from queued_threads where config_id = %s", [config_id])
    status, error = thread.fetchone()  # type: ignore[misc]
    assert status == "failed" and error == f"invalid job, not retried: {letter['error_message']}"
    assert api_calls(nylas, "threads.get") == api_calls(nylas, "messages.list") == 0


def test_a_rate_limited_webhook_waits_without_using_an_attempt(
    db_url: str, conn: psycopg.Connection, nylas: SimulatorHandle, tmp_path: Path
) -> None:
    # Given a webhook whose grant is over its Nylas rate limit: every call answers 429 with Retry-After: 1
    make_inbox(conn, GRANT)
    notification_id, message_id = queue_new_message_webhook(conn, nylas)
    nylas.faults.rate_limit_per_s, nylas.faults.rate_limit_burst = 1.0, 0

    def rate_limited_calls() -> int:
        return sum(n for (_, status), n in nylas.simulator.calls.snapshot().items() if status == 429)

    with start_workers(db_url, nylas, tmp_path) as workers:
        # When the worker has been told to wait three times (more than the webhook's 3 attempts would allow)
        wait_for(lambda: rate_limited_calls() >= 3, timeout_s=20, what=f"3 deferrals; log:\n{workers.log()[-3000:]}")

        # Then meanwhile the audit row is not 'error' and counts no finished attempt
        audit = audit_row(conn, notification_id)
        assert audit["status"] == "processing" and audit["attempts"] <= 1
        assert audit["error_message"].startswith("deferred by a rate limit, not an attempt")

        # And once the limit is lifted, the webhook is processed on its first attempt
        nylas.faults.rate_limit_per_s = None
        wait_for(lambda: audit_row(conn, notification_id)["status"] == "processed", timeout_s=20, what="processed")
    audit = audit_row(conn, notification_id)
    assert (audit["attempts"], audit["error_message"]) == (1, None)
    stored = conn.execute("select count(*) from flux_email_messages where nylas_message_id = %s", [message_id])
    assert stored.fetchone() == (1,) and dead_letters(conn) == {}


def test_testing_mode_processes_a_webhook_but_leaves_it_on_its_queue(
    db_url: str, conn: psycopg.Connection, nylas: SimulatorHandle, tmp_path: Path
) -> None:
    # Given workers in TESTING_MODE (the original's dry run) with a one-second visibility timeout, and a webhook
    make_inbox(conn, GRANT)
    notification_id, message_id = queue_new_message_webhook(conn, nylas)
    msg_id = audit_row(conn, notification_id)["msg_id"]

    def kept() -> bool:
        row = conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications where msg_id = %s", [msg_id])
        return row.fetchone() == (1,)

    with start_workers(db_url, nylas, tmp_path, TESTING_MODE="true", VISIBILITY_TIMEOUT="1"):
        # When it has been processed, and processed again after it came back
        wait_for(lambda: audit_row(conn, notification_id)["status"] == "processed", timeout_s=20, what="processed")
        first_run = audit_row(conn, notification_id)["processed_at"]
        wait_for(
            lambda: audit_row(conn, notification_id)["processed_at"] != first_run,
            timeout_s=20,
            what="a second run of the kept message",
        )

        # Then the message is still on its queue, under the same msg_id, as the original left it
        assert kept()

    # And the audit row shows the latest run: 'processed', stamped, the same single attempt each time (a kept
    # message's redelivery is not a retry); the original left it at 'processing'. The message itself is applied.
    audit = audit_row(conn, notification_id)
    assert (audit["status"], audit["attempts"], audit["error_message"]) == ("processed", 1, None)
    assert audit["processed_at"] > first_run and audit["processing_duration_ms"] is not None
    assert kept() and dead_letters(conn) == {}
    stored = conn.execute("select count(*) from flux_email_messages where nylas_message_id = %s", [message_id])
    assert stored.fetchone() == (1,)
