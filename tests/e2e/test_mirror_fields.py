"""The mirror check the end-to-end tests rely on sees every stored field and messages Nylas no longer has."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from nova_email import thread_sync
from nova_email.jobs import ThreadSyncJob
from nova_email.nylas.client import NylasClient
from nova_email.nylas.metrics import ApiCallCounter
from nova_email.simulator.server import SimulatorHandle, serve_in_thread
from tests.mirror import mirror_differences

GRANT = "grant-mirror"


@pytest.fixture
def nylas() -> Iterator[SimulatorHandle]:
    with serve_in_thread(seed=4, grants=[GRANT], threads_per_grant=6, large_body_share=0.0) as handle:
        yield handle


@pytest.fixture
def synced(conn: psycopg.Connection, nylas: SimulatorHandle) -> tuple[uuid.UUID, str]:
    """The inbox id and a thread of at least two messages, synced into the database."""
    row = conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s) returning id", [GRANT]).fetchone()
    assert row is not None
    thread_id = next(t.id for t in nylas.simulator.grants[GRANT].threads.values() if len(t.messages) >= 2)
    client = NylasClient(api_key="k", api_uri=nylas.base_url, counter=ApiCallCounter())
    try:
        thread_sync.sync_thread(conn, client, ThreadSyncJob(thread_id=thread_id, inbox_id=row[0], grant_id=GRANT))
    finally:
        client.close()
    return row[0], thread_id


def _only(export: dict[str, object], thread_id: str) -> dict[str, object]:
    export["threads"] = [t for t in export["threads"] if t["id"] == thread_id]  # type: ignore[attr-defined]
    return export


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        ("update flux_email_messages set metadata = '{\"tag\": \"x\"}' where id = %(message)s", " metadata: "),
        ("update flux_email_messages set headers = '[{\"name\": \"X\", \"value\": \"y\"}]' where id = %(message)s",
         " headers: "),
        ("update flux_email_messages set in_reply_to = '<a@b>' where id = %(message)s", " in_reply_to: "),
        ("update flux_email_messages set tracking_options = '{\"opens\": true}' where id = %(message)s",
         " tracking_options: "),
        ("update flux_email_messages set nylas_thread_id = 'thr_other' where id = %(message)s", " thread_id: "),
        ("update flux_email_threads set has_drafts = true where id = %(thread)s", " has_drafts: "),
    ],
    ids=["metadata", "headers", "in_reply_to", "tracking_options", "nylas_thread_id", "has_drafts"],
)  # fmt: skip
def test_a_changed_field_is_reported(
    conn: psycopg.Connection, nylas: SimulatorHandle, synced: tuple[uuid.UUID, str], change: str, reported: str
) -> None:
    inbox_id, thread_id = synced
    assert mirror_differences(conn, inbox_id, _only(nylas.export(GRANT), thread_id)) == []
    row = conn.execute(
        "select t.id, min(m.id::text)::uuid from flux_email_threads t join flux_email_messages m on m.thread_id = t.id"
        " where t.nylas_thread_id = %s group by t.id",
        [thread_id],
    ).fetchone()
    assert row is not None

    conn.execute(change, {"thread": row[0], "message": row[1]})  # type: ignore[arg-type]

    problems = mirror_differences(conn, inbox_id, _only(nylas.export(GRANT), thread_id))
    assert len(problems) == 1 and reported in problems[0], problems


def test_a_stored_message_deleted_at_nylas_is_reported(
    conn: psycopg.Connection, nylas: SimulatorHandle, synced: tuple[uuid.UUID, str]
) -> None:
    # Given a synced thread, one of whose messages is then deleted at Nylas with no webhook
    inbox_id, thread_id = synced
    gone = nylas.simulator.grants[GRANT].threads[thread_id].messages[0].id
    nylas.simulator.delete_message(GRANT, gone, emit=False)

    problems = mirror_differences(conn, inbox_id, _only(nylas.export(GRANT), thread_id))

    assert f"message {gone} stored but not at Nylas (thread {thread_id})" in problems
