"""The mirror comparison used by the sync tests can fail: it sees changed, missing and extra rows."""

from __future__ import annotations

import uuid

import psycopg

from nova_email import thread_sync
from nova_email.jobs import ThreadSyncJob
from nova_email.nylas.client import NylasClient
from nova_email.simulator.server import SimulatorHandle
from tests.mirror import mirror_differences
from tests.nova_email.conftest import GRANT


def test_the_mirror_check_reports_each_kind_of_difference(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    export = nylas.export(GRANT)
    first, second = export["threads"][0]["id"], export["threads"][1]["id"]
    for thread_id in (first, second):
        thread_sync.sync_thread(conn, client, ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT))
    export["threads"] = [t for t in export["threads"] if t["id"] in (first, second)]
    assert mirror_differences(conn, inbox_id, export) == []

    conn.execute("update flux_email_messages set starred = not starred where nylas_thread_id = %s", [first])
    conn.execute("update flux_email_threads set subject = 'changed' where nylas_thread_id = %s", [first])
    conn.execute("delete from flux_email_threads where nylas_thread_id = %s", [second])
    problems = mirror_differences(conn, inbox_id, export)

    assert any(p.startswith(f"thread {first} subject") for p in problems)
    assert any(" starred: " in p for p in problems)
    assert f"thread {second} missing" in problems
    assert any(p.startswith("message ") and p.endswith(" missing") for p in problems)
