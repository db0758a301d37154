"""One backfill scenario shared by the fault, security and load tests: a simulated mailbox, an inbox with a queued
backfill, the workers' environment, and the checks that the run ended exactly right.

"Exactly right" is the promise of a good queue: every thread of the one-year window is stored once and equals the
simulator's mailbox field by field, the stats counters equal a recount of ``queued_threads``, the backfill is
``completed``, and the queues hold nothing but what was dead-lettered with a reason.
"""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import psycopg
from psycopg import sql

from nova_email.simulator.server import SimulatorHandle
from tests.mirror import mirror_differences

#: The service's work queues (the periodic completion_monitor queue holds ticks, not work).
WORK_QUEUES = ("nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs")


@attrs.frozen(kw_only=True)
class Backfill:
    """A queued backfill of one grant's inbox."""

    grant_id: str
    inbox_id: uuid.UUID
    config_id: uuid.UUID
    #: Unix seconds: threads whose latest message is after this are in the one-year window.
    window_start: int


def queue_backfill(db_url: str, nylas: SimulatorHandle, grant_id: str) -> Backfill:
    """Create the grant's inbox and queue its one-year backfill, ending a day after the mailbox's newest mail."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [grant_id]).fetchone()
        assert row is not None
        inbox_id = row[0]
        end = datetime.fromtimestamp(nylas.simulator.anchor, UTC) + timedelta(days=1)
        row = conn.execute("select config_id from queue_inbox_backfill(%s, null, null, %s)", [inbox_id, end]).fetchone()
        assert row is not None
    return Backfill(
        grant_id=grant_id,
        inbox_id=inbox_id,
        config_id=row[0],
        window_start=int((end - timedelta(days=365)).timestamp()),
    )


def backfill_threads(db_url: str, config_id: uuid.UUID) -> int:
    """How many threads the backfill discovered in its window (its queued_threads rows)."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from queued_threads where config_id = %s", [config_id]).fetchone()
    return int(row[0]) if row else 0


#: Retry windows of the test workers, by variable: a job's last attempt comes at least this long after its first.
SHORT_RETRY_WINDOWS_MS = {
    "WEBHOOK_RETRY_WINDOW_MS": "3000",
    "BACKFILL_RETRY_WINDOW_MS": "6000",
    "THREAD_RETRY_WINDOW_MS": "15000",
}


def worker_env(db_url: str, nylas: SimulatorHandle, **overrides: str) -> dict[str, str]:
    """The workers' environment: no pacing and no legacy delays unless overridden, quick polls and checks."""
    env = {
        "DATABASE_URL": db_url,
        "NYLAS_API_URI": nylas.base_url,
        "NYLAS_API_KEY": "chaos-key",
        "NYLAS_GRANT_RATE": "0",
        "THREAD_DELAY_MS": "0",
        "MESSAGE_DELAY_MS": "0",
        "API_DELAY_MS": "0",
        "COMPLETION_CHECK_INTERVAL_MS": "500",
        "POLL_INTERVAL_MS": "200",
        "LOG_LEVEL": "info",
        # The scenarios exhaust a job's attempts on purpose: within seconds, not the default two minutes.
        **SHORT_RETRY_WINDOWS_MS,
    }
    env.update(overrides)
    return env


def backfill_status(db_url: str, config_id: uuid.UUID) -> str | None:
    """The configuration's ``backfill_status``."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select backfill_status from flux_inbox_configurations where id = %s", [config_id]
        ).fetchone()
    return None if row is None else str(row[0])


def queue_depths(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Messages still in each work queue (visible or not)."""
    depths = {}
    for queue in WORK_QUEUES:
        table = sql.Identifier("pgmq", f"q_{queue}")
        row = conn.execute(sql.SQL("select count(*) from {}").format(table)).fetchone()
        depths[queue] = int(row[0]) if row else -1
    return depths


def run_problems(db_url: str, nylas: SimulatorHandle, backfill: Backfill, *, mail_arrived: bool = False) -> list[str]:
    """Everything that differs from an exact run; empty when the backfill ended exactly right.

    With `mail_arrived` (webhooks added mail during the run) the mailbox has threads and messages the backfill never
    listed, so the backfill's own totals are not compared with the mailbox's; the field-by-field mirror still is.
    """
    export = nylas.export(backfill.grant_id)
    tracked = {t["id"] for t in export["threads"] if (t["latest_message_received_date"] or 0) > backfill.window_start}
    problems: list[str] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        problems += mirror_differences(conn, backfill.inbox_id, export, since=backfill.window_start)
        dup = conn.execute(
            "select (select count(*) - count(distinct (inbox_id, nylas_message_id)) from flux_email_messages),"
            " (select count(*) - count(distinct (inbox_id, nylas_thread_id)) from flux_email_threads),"
            " (select count(*) - count(distinct (config_id, nylas_thread_id)) from queued_threads)"
        ).fetchone()
        if dup != (0, 0, 0):
            problems.append(f"duplicate rows (messages, threads, queued_threads): {dup}")
        status = backfill_status(db_url, backfill.config_id)
        if status != "completed":
            problems.append(f"backfill status {status!r}, expected 'completed'")
        stats = conn.execute(
            "select threads_total, threads_queued, threads_processing, threads_completed, threads_failed,"
            " messages_synced from get_sync_progress(%s)",  # threads_queued there: waiting now, as recounted
            [backfill.config_id],
        ).fetchone()
        recount = conn.execute(
            "select count(*), count(*) filter (where status = 'queued'), count(*) filter (where status = 'processing'),"
            " count(*) filter (where status = 'completed'), count(*) filter (where status = 'failed'),"
            " coalesce(sum(messages_synced), 0) from queued_threads where config_id = %s",
            [backfill.config_id],
        ).fetchone()
        if stats != recount:
            problems.append(f"stats {stats} != recount of queued_threads {recount}")
        if not mail_arrived and recount is not None and (recount[0] != len(tracked) or recount[3] != len(tracked)):
            problems.append(f"{len(tracked)} threads in the window, queued_threads (total, completed): {recount[::3]}")
        stored = conn.execute(
            "select count(*) from flux_email_messages where inbox_id = %s", [backfill.inbox_id]
        ).fetchone()
        wanted = sum(m["thread_id"] in tracked for m in export["messages"])
        if not mail_arrived and recount is not None and recount[5] != wanted:
            problems.append(f"messages_synced {recount[5]} != {wanted} messages in the window's threads")
        if stored is None or stored[0] < wanted:
            problems.append(f"{stored} messages stored, {wanted} in the window's threads")
        depths = queue_depths(conn)
        dead = conn.execute(
            "select queue_name, count(*) filter (where reason is null or reason = ''), count(*)"
            " from pgmq_broker.dead_letters group by 1"
        ).fetchall()
    if any(depths.values()):
        problems.append(f"messages left in the work queues: {depths}")
    for queue, without_reason, total in dead:
        if without_reason:
            problems.append(f"{without_reason} of {total} dead letters on {queue} have no reason")
    return problems


def dead_letter_count(db_url: str) -> int:
    """Dead letters recorded on any queue."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from pgmq_broker.dead_letters").fetchone()
    return int(row[0]) if row else -1


def count_thread_fetches(nylas: SimulatorHandle) -> collections.Counter[str]:
    """From now on, count per thread id the simulator's answers to the first page of ``GET /messages?thread_id=``:
    the call every thread sync makes first, and exactly once."""
    fetches: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    original = nylas.simulator.list_messages

    def list_messages(grant_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        if query.get("thread_id") and not query.get("page_token"):
            with lock:
                fetches[query["thread_id"]] += 1
        return original(grant_id, query)

    nylas.simulator.list_messages = list_messages  # type: ignore[method-assign]
    return fetches
