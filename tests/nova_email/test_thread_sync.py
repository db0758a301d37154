"""Thread sync against a real database and the Nylas simulator."""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import psycopg
import pytest
from psycopg.rows import class_row

from nova_email import thread_sync
from nova_email.jobs import ThreadSyncJob, structure_job
from nova_email.nylas import RateLimited
from nova_email.nylas.client import NylasClient
from nova_email.nylas.models import Message, Thread
from nova_email.simulator.server import SimulatorHandle
from nova_email.thread_sync import ThreadSyncOutcome
from tests.mirror import mirror_differences
from tests.nova_email.conftest import GRANT


def make_thread_of(nylas: SimulatorHandle, size: int) -> str:
    """A thread with exactly `size` messages in the simulated mailbox; of 0, a thread holding only a draft."""
    if size == 0:
        return str(nylas.simulator.add_draft(GRANT, subject="Thread of 0")["thread_id"])
    first = nylas.simulator.add_message(GRANT, subject=f"Thread of {size}", emit=False)
    for _ in range(size - 1):
        nylas.simulator.add_message(GRANT, thread_id=first["thread_id"], emit=False)
    return str(first["thread_id"])


def track(conn: psycopg.Connection, inbox_id: uuid.UUID, thread_id: str) -> uuid.UUID:
    """A configuration tracking `thread_id` in queued_threads, as a backfill would leave it."""
    config = conn.execute("insert into flux_inbox_configurations (inbox_id) values (%s) returning id", [inbox_id])
    config_id = config.fetchone()[0]  # type: ignore[index]
    conn.execute("select insert_queued_thread_idempotent(%s, %s, %s, %s)", [config_id, inbox_id, thread_id, GRANT])
    return config_id  # type: ignore[no-any-return]


@attrs.frozen
class QueuedRow:
    status: str
    messages_synced: int
    note: str | None
    error_message: str | None
    attempts: int


def queued_row(conn: psycopg.Connection, config_id: uuid.UUID, thread_id: str) -> QueuedRow:
    with conn.cursor(row_factory=class_row(QueuedRow)) as cur:
        row = cur.execute(
            "select status, messages_synced, note, error_message, attempts from queued_threads"
            " where config_id = %s and nylas_thread_id = %s",
            [config_id, thread_id],
        ).fetchone()
    assert row is not None
    return row


@pytest.mark.parametrize("size", [0, 1, 50, 300], ids=lambda n: f"{n}-messages")
def test_a_thread_is_stored_with_every_message_and_every_field(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, size: int
) -> None:
    # Given a thread of `size` messages (0: only a draft; 300 spans two pages of the message list)
    thread_id = make_thread_of(nylas, size)
    config_id = track(conn, inbox_id, thread_id)
    job = ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT, config_id=config_id)

    # When it is synced
    result = thread_sync.sync_thread(conn, client, job)

    # Then the database holds it exactly as Nylas serves it, and the tracked row is completed
    assert result.outcome is ThreadSyncOutcome.SYNCED and result.messages == size
    export = nylas.export(GRANT)
    export["threads"] = [t for t in export["threads"] if t["id"] == thread_id]
    if size == 0:
        # With no received message, latest_message_received_date falls back to the draft's date, as in the original
        drafts = nylas.simulator.grants[GRANT].threads[thread_id].drafts
        export["threads"][0]["latest_message_received_date"] = drafts[-1].date
    assert mirror_differences(conn, inbox_id, export) == []
    stored = conn.execute(
        "select count(*) from flux_email_messages m join flux_email_threads t on t.id = m.thread_id"
        " where t.nylas_thread_id = %s",
        [thread_id],
    ).fetchone()
    assert stored == (size,)
    row = queued_row(conn, config_id, thread_id)
    assert (row.status, row.messages_synced) == ("completed", size)


def test_syncing_twice_changes_nothing(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id = make_thread_of(nylas, 5)
    job = ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT)
    thread_sync.sync_thread(conn, client, job)
    before = conn.execute("select count(*), max(synced_at) from flux_email_messages").fetchone()
    thread_sync.sync_thread(conn, client, job)
    after = conn.execute("select count(*) from flux_email_messages").fetchone()
    assert before is not None and after is not None and before[0] == after[0] == 5


def test_a_missing_grant_is_resolved_from_the_inbox(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id = make_thread_of(nylas, 2)
    result = thread_sync.sync_thread(conn, client, ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id))
    assert result.outcome is ThreadSyncOutcome.SYNCED and result.messages == 2


def test_a_thread_deleted_at_nylas_completes_with_a_note(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    config_id = track(conn, inbox_id, "thr_that_was_deleted")
    job = ThreadSyncJob(thread_id="thr_that_was_deleted", inbox_id=inbox_id, grant_id=GRANT, config_id=config_id)
    result = thread_sync.sync_thread(conn, client, job)
    assert result.outcome is ThreadSyncOutcome.DELETED
    row = queued_row(conn, config_id, "thr_that_was_deleted")
    assert (row.status, row.messages_synced, row.note) == ("completed", 0, "thread deleted at Nylas")


def test_an_expired_grant_marks_the_inbox_and_stops_its_jobs(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    first, second = make_thread_of(nylas, 1), make_thread_of(nylas, 1)
    config_id = track(conn, inbox_id, first)
    conn.execute("select insert_queued_thread_idempotent(%s, %s, %s, %s)", [config_id, inbox_id, second, GRANT])
    nylas.simulator.expire_grant(GRANT, emit=False)
    calls_before = sum(client.counter.snapshot().values())

    result = thread_sync.sync_thread(
        conn, client, ThreadSyncJob(thread_id=first, inbox_id=inbox_id, config_id=config_id)
    )
    second_result = thread_sync.sync_thread(
        conn, client, ThreadSyncJob(thread_id=second, inbox_id=inbox_id, config_id=config_id)
    )

    assert result.outcome is second_result.outcome is ThreadSyncOutcome.GRANT_EXPIRED
    assert conn.execute("select status from flux_inboxes where id = %s", [inbox_id]).fetchone() == ("auth_expired",)
    assert queued_row(conn, config_id, first).status == queued_row(conn, config_id, second).status == "failed"
    # The second job made no API call at all: the inbox was already known to be expired.
    assert sum(client.counter.snapshot().values()) - calls_before == 1


def test_a_job_for_a_completed_thread_syncs_it_again_and_keeps_it_completed(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a thread its backfill completed, whose stored copy then went stale (a reply came, its webhook was lost)
    thread_id = make_thread_of(nylas, 3)
    config_id = track(conn, inbox_id, thread_id)
    job = ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, config_id=config_id)
    thread_sync.sync_thread(conn, client, job)
    nylas.simulator.add_message(GRANT, thread_id=thread_id, emit=False)

    # When a job for it runs again (a redelivery, or a queue_thread_sync() call)
    again = thread_sync.sync_thread(conn, client, job)

    # Then the thread is synced as Nylas has it now, and its row stays completed without another attempt counted
    assert again.outcome is ThreadSyncOutcome.SYNCED and again.messages == 4
    export = nylas.export(GRANT)
    export["threads"] = [t for t in export["threads"] if t["id"] == thread_id]
    assert mirror_differences(conn, inbox_id, export) == []
    row = queued_row(conn, config_id, thread_id)
    assert (row.status, row.messages_synced, row.attempts) == ("completed", 4, 1)


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked-without-listed-copy"])
def test_a_job_from_queue_thread_sync_without_a_listed_copy_fetches_the_thread_and_its_messages(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, tracked: bool
) -> None:
    # Given a thread with no copy listed by a backfill, queued through queue_thread_sync()
    thread_id = make_thread_of(nylas, 3)
    config_id = track(conn, inbox_id, thread_id) if tracked else None
    conn.execute("select queue_thread_sync(%s, null, %s, %s)", [thread_id, inbox_id, config_id])
    payload = conn.execute("select message from pgmq.q_thread_sync_jobs").fetchone()
    assert payload is not None
    before = nylas.calls_by_endpoint()

    # When its job runs
    result = thread_sync.sync_thread(conn, client, structure_job(payload[0], ThreadSyncJob))

    # Then the thread was fetched as well as its messages, and it is stored as Nylas serves it
    calls = nylas.calls_by_endpoint()
    fetched = {endpoint: calls.get(endpoint, 0) - before.get(endpoint, 0) for endpoint in calls}
    assert result.thread_fetched
    assert (fetched.get("threads.get", 0), fetched.get("messages.list", 0)) == (1, 1)
    export = nylas.export(GRANT)
    export["threads"] = [t for t in export["threads"] if t["id"] == thread_id]
    assert mirror_differences(conn, inbox_id, export) == []


def test_the_last_failure_leaves_the_thread_failed_with_its_error(
    conn: psycopg.Connection, inbox_id: uuid.UUID
) -> None:
    config_id = track(conn, inbox_id, "thr_x")
    job = ThreadSyncJob(thread_id="thr_x", inbox_id=inbox_id, config_id=config_id)
    thread_sync.record_thread_failure(conn, job, "gave up after 5 attempt(s): ServerError: 503")
    row = queued_row(conn, config_id, "thr_x")
    assert (row.status, row.error_message) == ("failed", "gave up after 5 attempt(s): ServerError: 503")


def test_an_unknown_inbox_is_an_invalid_job(conn: psycopg.Connection, client: NylasClient) -> None:
    from nova_email.errors import InvalidJob

    with pytest.raises(InvalidJob, match="does not exist"):
        thread_sync.sync_thread(conn, client, ThreadSyncJob(thread_id="t", inbox_id=uuid.uuid4()))


def test_a_rate_limited_attempt_puts_the_thread_back_without_counting_an_attempt(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a tracked thread, and Nylas answering 429 to everything
    thread_id = make_thread_of(nylas, 2)
    config_id = track(conn, inbox_id, thread_id)
    job = ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, config_id=config_id)
    nylas.simulator.faults.update({"rate_limit_per_s": 0.001, "rate_limit_burst": 0})

    # When an attempt is rate limited and the job re-scheduled (what the actor does)
    with pytest.raises(RateLimited):
        thread_sync.sync_thread(conn, client, job)
    thread_sync.release_thread(conn, job)

    # Then the thread waits as queued with no attempt used; the next attempt is its first
    row = queued_row(conn, config_id, thread_id)
    assert (row.status, row.attempts) == ("queued", 0)
    nylas.simulator.faults.update({"rate_limit_per_s": None})
    thread_sync.sync_thread(conn, client, job)
    row = queued_row(conn, config_id, thread_id)
    assert (row.status, row.attempts) == ("completed", 1)


class ReplyBeforeThreadClient(NylasClient):
    """A real client; a reply reaches the thread at Nylas after its messages were read and before the thread is."""

    def __init__(self, *args: Any, nylas: SimulatorHandle, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nylas, self.replied = nylas, False

    def get_thread(self, grant_id: str, thread_id: str) -> Thread:
        if not self.replied:
            self.replied = True
            self.nylas.simulator.add_message(GRANT, thread_id=thread_id, emit=False)
        return super().get_thread(grant_id, thread_id)


def test_a_reply_between_the_message_list_and_the_thread_read_is_stored_too(
    conn: psycopg.Connection, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a thread whose reply arrives while it is being synced, between the two reads
    thread_id = make_thread_of(nylas, 2)
    job = ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT)
    client = ReplyBeforeThreadClient(api_key="k", api_uri=nylas.base_url, nylas=nylas)

    # When it is synced
    thread_sync.sync_thread(conn, client, job)

    # Then the thread row names no message the mirror lacks, and names every message Nylas has
    named = conn.execute(
        "select message_ids from flux_email_threads where inbox_id = %s and nylas_thread_id = %s", [inbox_id, thread_id]
    ).fetchone()
    stored = conn.execute(
        "select nylas_message_id from flux_email_messages where inbox_id = %s and nylas_thread_id = %s",
        [inbox_id, thread_id],
    ).fetchall()
    at_nylas = sorted(m.id for m in nylas.simulator.grants[GRANT].threads[thread_id].messages)
    assert named is not None and sorted(named[0]) == sorted(m for (m,) in stored) == at_nylas


def test_a_draft_among_the_fetched_messages_makes_the_listed_copy_stale() -> None:
    # Providers that list drafts among a thread's messages show a draft saved after the listing there
    listed = Thread(id="thr_1", grant_id=GRANT, message_ids=("msg_1",), folders=("INBOX",))
    sent = Message(id="msg_1", grant_id=GRANT, thread_id="thr_1", folders=("INBOX",))
    draft = Message(id="msg_1", grant_id=GRANT, thread_id="thr_1", object="draft", folders=("INBOX",))
    assert thread_sync.listed_copy_is_current(listed, [sent])
    assert not thread_sync.listed_copy_is_current(listed, [draft])
