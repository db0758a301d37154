"""The webhook processor against a real database and the Nylas simulator.

Every job is produced the way production produces it: ``queue_nylas_webhook_notification`` writes the
audit row and the PGMQ message, and the test reads that message back from the queue table and
structures it. Payloads are the simulator's own notifications.
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from nova_email import thread_sync, webhooks
from nova_email.errors import InvalidJob
from nova_email.jobs import ThreadSyncJob, WebhookJob, structure_job
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import RateLimited, ServerError
from nova_email.nylas.metrics import ApiCallCounter
from nova_email.nylas.models import Thread
from nova_email.simulator import webhooks as sim_webhooks
from nova_email.simulator.server import SimulatorHandle
from nova_email.simulator.webhooks import Notification
from nova_email.webhooks import WebhookOutcome
from tests.mirror import mirror_differences
from tests.nova_email.conftest import GRANT

# -- helpers ---------------------------------------------------------------------------------------------------------


def deliver(conn: psycopg.Connection, note: Notification, *, grant_id: str | None = None) -> WebhookJob:
    """Hand a notification to the SQL intake and read its job back from the queue, as a worker would get it."""
    row = conn.execute(
        "select notification_id, msg_id, duplicate from queue_nylas_webhook_notification(%s, %s, %s, %s)",
        [note.id, note.type, note.grant_id if grant_id is None else grant_id, Jsonb(note.payload)],
    ).fetchone()
    assert row is not None and row[2] is False
    message = conn.execute("select message from pgmq.q_nylas_webhook_notifications where msg_id = %s", [row[1]])
    found = message.fetchone()
    assert found is not None
    return structure_job(found[0], WebhookJob)


def audit(conn: psycopg.Connection, job: WebhookJob) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select status, attempts, error_message, processing_duration_ms, processed_at"
            " from flux_webhook_notifications where id = %s",
            [job.notification_id],
        ).fetchone()
    assert row is not None
    return row


def last_emitted(nylas: SimulatorHandle, type_prefix: str) -> Notification:
    return next(n for n in reversed(nylas.simulator.emitted) if n.type.startswith(type_prefix))


def stored_message(conn: psycopg.Connection, message_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select m.*, t.nylas_thread_id as parent from flux_email_messages m"
            " join flux_email_threads t on t.id = m.thread_id where m.nylas_message_id = %s",
            [message_id],
        ).fetchone()


def differences_for(
    conn: psycopg.Connection, nylas: SimulatorHandle, inbox_id: uuid.UUID, *thread_ids: str
) -> list[str]:
    """Differences between the DB and Nylas, restricted to `thread_ids`."""
    export = nylas.export(GRANT)
    export["threads"] = [t for t in export["threads"] if t["id"] in thread_ids]
    return mirror_differences(conn, inbox_id, export)


def synced_thread(conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, thread_id: str) -> None:
    """Store a thread through thread sync, as a backfill would have left it."""
    thread_sync.sync_thread(conn, client, ThreadSyncJob(thread_id=thread_id, inbox_id=inbox_id, grant_id=GRANT))


def any_thread(nylas: SimulatorHandle) -> str:
    return sorted(nylas.simulator.grants[GRANT].threads)[0]


def api_calls(client: NylasClient) -> int:
    return sum(client.counter.snapshot().values())


def processed(
    conn: psycopg.Connection, client: NylasClient, job: WebhookJob, *, attempt: int | None = None
) -> webhooks.WebhookResult:
    result = webhooks.process_webhook(conn, client, job, attempt=attempt)
    assert result.outcome is WebhookOutcome.PROCESSED, result.reason
    return result


# -- message.created / message.updated -------------------------------------------------------------------------------


def test_a_new_message_on_an_unknown_thread_pulls_in_the_whole_thread(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a reply arriving on a thread the mirror does not hold yet
    thread_id = any_thread(nylas)
    data = nylas.simulator.add_message(GRANT, thread_id=thread_id)
    job = deliver(conn, last_emitted(nylas, "message.created"))

    # When its webhook is processed
    result = webhooks.process_webhook(conn, client, job)

    # Then the whole thread, every message included, is stored exactly as Nylas serves it
    assert result.outcome is WebhookOutcome.PROCESSED
    assert differences_for(conn, nylas, inbox_id, thread_id) == []
    assert stored_message(conn, data["id"]) is not None
    # and the audit row says processed, one attempt, with a duration and no error
    row = audit(conn, job)
    assert (row["status"], row["attempts"], row["error_message"]) == ("processed", 1, None)
    assert row["processing_duration_ms"] is not None and row["processing_duration_ms"] >= 0
    assert row["processed_at"] is not None
    last_webhook = conn.execute("select last_webhook_at from flux_inboxes where id = %s", [inbox_id]).fetchone()
    assert last_webhook is not None and last_webhook[0] is not None


def test_a_new_message_on_a_known_thread_is_added_and_the_thread_metadata_follows(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id = any_thread(nylas)
    synced_thread(conn, client, inbox_id, thread_id)
    data = nylas.simulator.add_message(GRANT, thread_id=thread_id, subject="Fresh news")
    calls_before = api_calls(client)

    processed(conn, client, deliver(conn, last_emitted(nylas, "message.created")))

    assert differences_for(conn, nylas, inbox_id, thread_id) == []
    stored = stored_message(conn, data["id"])
    assert stored is not None and stored["subject"] == "Fresh news" and stored["parent"] == thread_id
    # One message and one thread fetched; the thread's other messages are not listed again.
    assert api_calls(client) - calls_before == 2


def test_message_updated_changes_the_stored_flags_and_folders(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id = any_thread(nylas)
    message_id = nylas.simulator.add_message(GRANT, thread_id=thread_id, unread=True, emit=False)["id"]
    synced_thread(conn, client, inbox_id, thread_id)
    assert stored_message(conn, message_id)["unread"] is True  # type: ignore[index]

    nylas.simulator.update_message(GRANT, message_id, unread=False, starred=True, folders=["INBOX", "IMPORTANT"])
    processed(conn, client, deliver(conn, last_emitted(nylas, "message.updated")))

    stored = stored_message(conn, message_id)
    assert stored is not None
    assert (stored["unread"], stored["starred"], stored["folders"]) == (False, True, ["INBOX", "IMPORTANT"])
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


def test_a_truncated_message_is_stored_with_its_full_body_fetched_from_nylas(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a message over 1 MB, whose webhook arrives as message.created.truncated without a body
    body = "<p>" + "x" * 1_100_000 + "</p>"
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas), body=body)
    note = last_emitted(nylas, "message.created")
    assert note.type == "message.created.truncated" and "body" not in note.payload["data"]["object"]

    processed(conn, client, deliver(conn, note))

    stored = stored_message(conn, data["id"])
    assert stored is not None and stored["body"] == body


@pytest.mark.parametrize(
    "suffix",
    [".truncated", ".transformed", ".cleaned", ".cleaned.transformed", ".cleaned.transformed.truncated"],
    ids=lambda s: s.lstrip("."),
)
@pytest.mark.parametrize("base", ["message.created", "message.updated"])
def test_suffixed_and_stripped_down_events_fetch_the_full_message(
    conn: psycopg.Connection,
    client: NylasClient,
    nylas: SimulatorHandle,
    inbox_id: uuid.UUID,
    base: str,
    suffix: str,
) -> None:
    # Given an event whose object carries only the id (field customisation left everything else out)
    thread_id = any_thread(nylas)
    data = nylas.simulator.add_message(GRANT, thread_id=thread_id, body="<p>the real body</p>", emit=False)
    note = sim_webhooks.message_event(base, {"object": "message", "id": data["id"], "grant_id": GRANT})
    note = Notification(id=note.id, type=base + suffix, grant_id=GRANT, payload={**note.payload, "type": base + suffix})

    processed(conn, client, deliver(conn, note))

    stored = stored_message(conn, data["id"])
    assert stored is not None and stored["body"] == "<p>the real body</p>" and stored["parent"] == thread_id
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


@pytest.mark.parametrize(
    "place",
    ["data.id", "object.id"],
)
def test_the_message_id_is_found_where_older_payload_shapes_put_it(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, place: str
) -> None:
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas), emit=False)
    note = sim_webhooks.message_event("message.created", {"object": "message", "grant_id": GRANT})
    payload = copy.deepcopy(note.payload)
    if place == "data.id":
        payload["data"]["id"] = data["id"]
    else:
        payload["object"] = {"id": data["id"]}

    processed(conn, client, deliver(conn, Notification(id=note.id, type=note.type, grant_id=GRANT, payload=payload)))

    assert stored_message(conn, data["id"]) is not None


@pytest.mark.parametrize("object_id", [None, "", "  ", ".", ".."], ids=["absent", "empty", "blank", "dot", "dotdot"])
def test_a_payload_without_a_message_id_is_ignored_with_the_reason(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, object_id: str | None
) -> None:
    # The envelope's own "id" is the notification's, not a message's: it must not be taken for one either.
    obj = {"object": "message", "grant_id": GRANT} | ({} if object_id is None else {"id": object_id})
    note = sim_webhooks.message_event("message.updated", obj)
    job = deliver(conn, note)
    result = webhooks.process_webhook(conn, client, job)
    assert result.outcome is WebhookOutcome.IGNORED
    row = audit(conn, job)
    assert row["status"] == "ignored" and "message id missing" in row["error_message"]
    assert api_calls(client) == 0


# -- thread.replied --------------------------------------------------------------------------------------------------


def owner_thread_with_reply(nylas: SimulatorHandle) -> tuple[str, str]:
    """A thread the mailbox owner started, and a received reply to it (which emits thread.replied)."""
    owner = nylas.simulator.grants[GRANT].email
    root = nylas.simulator.add_message(GRANT, sender_email=owner, subject="Proposal", emit=False)
    reply = nylas.simulator.add_message(GRANT, thread_id=root["thread_id"])
    return str(root["thread_id"]), str(reply["id"])


def test_thread_replied_refreshes_the_thread_metadata(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    owner = nylas.simulator.grants[GRANT].email
    root = nylas.simulator.add_message(GRANT, sender_email=owner, subject="Proposal", emit=False)
    thread_id = str(root["thread_id"])
    synced_thread(conn, client, inbox_id, thread_id)
    nylas.simulator.add_message(GRANT, thread_id=thread_id)
    note = last_emitted(nylas, "thread.replied")
    assert note.payload["data"]["object"]["thread_id"] == thread_id

    processed(conn, client, deliver(conn, note))

    row = conn.execute("select message_ids, unread from flux_email_threads where nylas_thread_id = %s", [thread_id])
    message_ids, unread = row.fetchone()  # type: ignore[misc]
    expected = next(t for t in nylas.export(GRANT)["threads"] if t["id"] == thread_id)
    assert message_ids == expected["message_ids"] and len(message_ids) == 2
    assert unread == expected["unread"]


def test_thread_replied_for_a_thread_not_yet_stored_pulls_in_its_messages(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # A thread row without its messages would make later backfills skip the thread as "already current".
    thread_id, _reply_id = owner_thread_with_reply(nylas)
    processed(conn, client, deliver(conn, last_emitted(nylas, "thread.replied")))
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


def test_thread_replied_without_a_thread_id_finds_the_thread_through_the_reply(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id, _reply_id = owner_thread_with_reply(nylas)
    note = last_emitted(nylas, "thread.replied")
    payload = copy.deepcopy(note.payload)
    payload["data"]["object"].pop("thread_id")
    processed(conn, client, deliver(conn, Notification(id=note.id, type=note.type, grant_id=GRANT, payload=payload)))
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


# -- grant.expired ---------------------------------------------------------------------------------------------------


def test_grant_expired_marks_the_inbox_and_later_events_make_no_api_calls(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a grant that expires at Nylas
    nylas.simulator.expire_grant(GRANT)
    calls_before = api_calls(client)

    # When its grant.expired webhook is processed
    job = deliver(conn, last_emitted(nylas, "grant.expired"))
    processed(conn, client, job)

    # Then the inbox is auth_expired and failing, and the audit row says processed
    inbox = conn.execute("select status, webhook_health_status from flux_inboxes where id = %s", [inbox_id])
    assert inbox.fetchone() == ("auth_expired", "failing")
    assert audit(conn, job)["status"] == "processed"

    # And a message event for that inbox afterwards is ignored without calling Nylas
    note = sim_webhooks.message_event("message.created", {"object": "message", "id": "msg_x", "grant_id": GRANT})
    later = deliver(conn, note)
    result = webhooks.process_webhook(conn, client, later)
    assert result.outcome is WebhookOutcome.IGNORED and "auth_expired" in (result.reason or "")
    assert audit(conn, later)["status"] == "ignored"
    assert api_calls(client) == calls_before


def test_a_401_during_a_message_event_marks_the_inbox_auth_expired(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # The grant.expired webhook can lag by minutes; the first 401 already tells us.
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    job = deliver(conn, last_emitted(nylas, "message.created"))
    nylas.simulator.expire_grant(GRANT, emit=False)

    result = webhooks.process_webhook(conn, client, job)

    assert result.outcome is WebhookOutcome.IGNORED and "expired" in (result.reason or "")
    assert conn.execute("select status from flux_inboxes where id = %s", [inbox_id]).fetchone() == ("auth_expired",)
    assert stored_message(conn, data["id"]) is None


def test_grant_expired_for_an_unknown_grant_is_ignored_with_the_reason(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID
) -> None:
    job = deliver(conn, sim_webhooks.grant_expired(grant_id="grant-nobody", email="nobody@inbox.example"))
    result = webhooks.process_webhook(conn, client, job)
    assert result.outcome is WebhookOutcome.IGNORED
    row = audit(conn, job)
    assert row["status"] == "ignored" and "grant-nobody" in row["error_message"]
    assert conn.execute("select status from flux_inboxes where id = %s", [inbox_id]).fetchone() == ("active",)


# -- ignored events --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["calendar.created", "message.deleted", "grant.updated", "message.createdx"])
def test_unhandled_types_are_ignored_not_failed_and_call_nothing(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, type_: str
) -> None:
    note = sim_webhooks.message_event("message.created", {"object": "message", "id": "msg_1", "grant_id": GRANT})
    note = Notification(id=note.id, type=type_, grant_id=GRANT, payload={**note.payload, "type": type_})
    job = deliver(conn, note)

    result = webhooks.process_webhook(conn, client, job)

    assert result.outcome is WebhookOutcome.IGNORED
    row = audit(conn, job)
    assert row["status"] == "ignored" and type_ in row["error_message"] and "not handled" in row["error_message"]
    assert api_calls(client) == 0


def test_an_event_for_a_deleted_message_is_ignored_with_the_reason(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a message created and deleted before its created webhook is processed
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    job = deliver(conn, last_emitted(nylas, "message.created"))
    nylas.simulator.delete_message(GRANT, data["id"])

    result = webhooks.process_webhook(conn, client, job)

    assert result.outcome is WebhookOutcome.IGNORED
    row = audit(conn, job)
    assert row["status"] == "ignored" and f"message {data['id']} no longer exists at Nylas" in row["error_message"]
    assert row["processed_at"] is not None and row["attempts"] == 1
    assert stored_message(conn, data["id"]) is None


def test_an_event_whose_thread_was_deleted_meanwhile_is_ignored(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id, _reply = owner_thread_with_reply(nylas)
    job = deliver(conn, last_emitted(nylas, "thread.replied"))
    for message in list(nylas.simulator.grants[GRANT].threads[thread_id].messages):
        nylas.simulator.delete_message(GRANT, message.id, emit=False)

    result = webhooks.process_webhook(conn, client, job)

    assert result.outcome is WebhookOutcome.IGNORED and f"thread {thread_id} no longer exists" in (result.reason or "")


def test_an_event_for_an_unknown_grant_is_ignored_with_the_reason(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    note = sim_webhooks.message_event("message.created", {"object": "message", "id": "msg_1", "grant_id": "grant-x"})
    job = deliver(conn, note)
    assert job.inbox_id is None

    result = webhooks.process_webhook(conn, client, job)

    assert result.outcome is WebhookOutcome.IGNORED
    assert "no inbox has grant 'grant-x'" in audit(conn, job)["error_message"]
    assert api_calls(client) == 0


def test_an_event_without_any_grant_is_ignored_with_the_reason(conn: psycopg.Connection, client: NylasClient) -> None:
    note = sim_webhooks.message_event("message.created", {"object": "message", "id": "msg_1"})
    job = deliver(conn, note, grant_id="")
    result = webhooks.process_webhook(conn, client, job)
    assert result.outcome is WebhookOutcome.IGNORED and "no grant id" in (result.reason or "")


def test_an_inbox_connected_after_the_webhook_arrived_is_found_by_its_grant(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle
) -> None:
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    job = deliver(conn, last_emitted(nylas, "message.created"))
    assert job.inbox_id is None
    conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s)", [GRANT])

    processed(conn, client, job)

    assert stored_message(conn, data["id"]) is not None


# -- duplicates, order and concurrency -------------------------------------------------------------------------------


def test_a_redelivered_notification_is_recorded_and_queued_once(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    note = last_emitted(nylas, "message.created")
    first = deliver(conn, note)
    again = note.redelivered()

    row = conn.execute(
        "select notification_id, duplicate from queue_nylas_webhook_notification(%s, %s, %s, %s)",
        [again.id, again.type, again.grant_id, Jsonb(again.payload)],
    ).fetchone()

    assert row == (first.notification_id, True)
    count = conn.execute("select count(*) from pgmq.q_nylas_webhook_notifications").fetchone()
    assert count == (1,)


def test_processing_the_same_job_twice_changes_nothing(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    thread_id = any_thread(nylas)
    nylas.simulator.add_message(GRANT, thread_id=thread_id)
    job = deliver(conn, last_emitted(nylas, "message.created"))
    processed(conn, client, job)
    snapshot = "select nylas_message_id, unread, starred, folders, body from flux_email_messages order by 1"
    before = conn.execute(snapshot).fetchall()

    processed(conn, client, job)

    assert conn.execute(snapshot).fetchall() == before
    assert audit(conn, job)["attempts"] == 2
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


def test_an_older_event_processed_last_does_not_regress_the_message(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a message created unread, then read, then starred; the webhooks arrive newest first
    thread_id = any_thread(nylas)
    data = nylas.simulator.add_message(GRANT, thread_id=thread_id, unread=True)
    created = deliver(conn, last_emitted(nylas, "message.created"))
    nylas.simulator.mark_read(GRANT, data["id"])
    read = deliver(conn, last_emitted(nylas, "message.updated"))
    nylas.simulator.update_message(GRANT, data["id"], starred=True)
    starred = deliver(conn, last_emitted(nylas, "message.updated"))

    for job in (starred, read, created):
        processed(conn, client, job)

    # Then the mirror shows the current state: read and starred
    stored = stored_message(conn, data["id"])
    assert stored is not None and (stored["unread"], stored["starred"]) == (False, True)
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


class PausingClient(NylasClient):
    """A real client that, once armed, holds the next thread fetch until released (to interleave two workers)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed = False
        self.fetched = threading.Event()
        self.release = threading.Event()

    def get_thread(self, grant_id: str, thread_id: str) -> Thread:
        thread = super().get_thread(grant_id, thread_id)
        if self.armed:
            self.armed = False
            self.fetched.set()
            assert self.release.wait(30), "the test never released the paused worker"
        return thread


def test_a_slow_worker_holding_an_older_read_does_not_overwrite_a_newer_one(
    db_url: str, conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a stored message, and a worker A that has read it (unread) but not written it yet
    thread_id = any_thread(nylas)
    data = nylas.simulator.add_message(GRANT, thread_id=thread_id, unread=True)
    created = deliver(conn, last_emitted(nylas, "message.created"))
    synced_thread(conn, client, inbox_id, thread_id)
    slow = PausingClient(api_key="test-key", api_uri=nylas.base_url, max_retries=0, counter=ApiCallCounter())
    slow.armed = True
    outcome: list[webhooks.WebhookResult] = []

    def worker_a() -> None:
        with psycopg.connect(db_url, autocommit=True) as own:
            outcome.append(webhooks.process_webhook(own, slow, created))

    a = threading.Thread(target=worker_a)
    a.start()
    try:
        assert slow.fetched.wait(30)
        # When the message is read at Nylas and worker B applies that change first
        nylas.simulator.mark_read(GRANT, data["id"])
        processed(conn, client, deliver(conn, last_emitted(nylas, "message.updated")))
    finally:
        slow.release.set()
        a.join(30)
        slow.close()

    # Then A's older read lands after B's newer one and changes nothing
    assert outcome and outcome[0].outcome is WebhookOutcome.PROCESSED
    stored = stored_message(conn, data["id"])
    assert stored is not None and stored["unread"] is False
    assert differences_for(conn, nylas, inbox_id, thread_id) == []


# -- failures --------------------------------------------------------------------------------------------------------


def test_a_transient_failure_is_recorded_as_error_and_the_retry_succeeds(
    conn: psycopg.Connection, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    job = deliver(conn, last_emitted(nylas, "message.created"))
    client = NylasClient(api_key="test-key", api_uri=nylas.base_url, max_retries=0, counter=ApiCallCounter())
    try:
        # When Nylas answers 5xx, the error propagates (so the actor retries) and the audit row says why
        nylas.faults.error_rate = 1.0
        with pytest.raises(ServerError):
            webhooks.process_webhook(conn, client, job)
        row = audit(conn, job)
        assert (row["status"], row["attempts"]) == ("error", 1)
        assert row["error_message"].startswith("ServerError:") and row["processing_duration_ms"] is not None

        # And the retry, once Nylas is back, ends processed with the error cleared
        nylas.faults.error_rate = 0.0
        processed(conn, client, job)
    finally:
        client.close()
    row = audit(conn, job)
    assert (row["status"], row["attempts"], row["error_message"]) == ("processed", 2, None)
    assert stored_message(conn, data["id"]) is not None


def test_a_rate_limited_run_is_deferred_without_using_an_attempt_or_showing_error(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID
) -> None:
    # Given a webhook whose first attempt failed, and whose grant is now over its Nylas rate limit (429s)
    data = nylas.simulator.add_message(GRANT, thread_id=any_thread(nylas))
    job = deliver(conn, last_emitted(nylas, "message.created"))
    nylas.faults.error_rate = 1.0
    with pytest.raises(ServerError):
        webhooks.process_webhook(conn, client, job, attempt=1)
    nylas.faults.error_rate = 0.0
    nylas.faults.rate_limit_per_s, nylas.faults.rate_limit_burst = 0.001, 0

    # When the second attempt runs into the limit twice (the actor re-runs it after Retry-After; Dramatiq's retry
    # count, and so `attempt`, stays the same)
    for _ in range(2):
        with pytest.raises(RateLimited):
            webhooks.process_webhook(conn, client, job, attempt=2)

        # Then the audit row is not 'error', says why it waits, and still counts only the one real attempt
        row = audit(conn, job)
        assert (row["status"], row["attempts"]) == ("processing", 1)
        assert row["error_message"].startswith("deferred by a rate limit, not an attempt; runs again in")

    # And once the limit is lifted, the second attempt is the second one counted
    nylas.faults.rate_limit_per_s = None
    processed(conn, client, job, attempt=2)
    row = audit(conn, job)
    assert (row["status"], row["attempts"], row["error_message"]) == ("processed", 2, None)
    assert stored_message(conn, data["id"]) is not None


def test_giving_up_records_the_error_text_on_the_audit_row(conn: psycopg.Connection, inbox_id: uuid.UUID) -> None:
    note = sim_webhooks.message_event("message.created", {"object": "message", "id": "msg_1", "grant_id": GRANT})
    job = deliver(conn, note)
    webhooks.record_webhook_error(conn, job, "gave up after 3 attempt(s): ServerError: 503")
    row = audit(conn, job)
    assert (row["status"], row["error_message"]) == ("error", "gave up after 3 attempt(s): ServerError: 503")
    assert row["processed_at"] is not None


@pytest.mark.parametrize(
    "notification_id",
    [None, uuid.UUID("00000000-0000-4000-8000-000000000001"), "rejected"],
    ids=["no-notification-id", "unknown-notification-id", "rejected-notification"],
)
def test_a_job_without_an_audit_row_is_an_invalid_job_and_changes_nothing(
    conn: psycopg.Connection, client: NylasClient, nylas: SimulatorHandle, inbox_id: uuid.UUID, notification_id: Any
) -> None:
    # Given a webhook job that did not come from queue_nylas_webhook_notification: its outcome has nowhere to go
    if notification_id == "rejected":
        row = conn.execute("select record_rejected_webhook('{}', 'bad signature')").fetchone()
        assert row is not None
        notification_id = row[0]
    data = nylas.simulator.add_message(GRANT)
    note = last_emitted(nylas, "message.created")
    job = WebhookJob(
        notification_id=notification_id,
        webhook_id=note.id,
        notification_type=note.type,
        grant_id=GRANT,
        payload=note.payload,
    )

    audit_rows = "select id, status, attempts, error_message from flux_webhook_notifications order by id"
    before = conn.execute(audit_rows).fetchall()

    # When it is processed, it is refused with the way to enqueue it properly, and nothing is applied
    with pytest.raises(InvalidJob, match="enqueue webhooks with queue_nylas_webhook_notification"):
        webhooks.process_webhook(conn, client, job)
    assert stored_message(conn, data["id"]) is None and api_calls(client) == 0
    assert conn.execute(audit_rows).fetchall() == before


# -- arbitrary bodies ------------------------------------------------------------------------------------------------

# jsonb cannot hold NUL; the intake refuses such bodies before anything is queued (tests/sql covers that).
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_object = st.fixed_dictionaries(
    {},
    optional={
        "id": _json | st.sampled_from(["msg_unknown", ".", ".."]),
        "thread_id": _json | st.just("."),
        "message_id": _json | st.just(".."),
        "grant_id": _json,
    },
)
_payload = st.fixed_dictionaries(
    {"id": _text},
    optional={"data": _json | st.fixed_dictionaries({}, optional={"object": _object | _json, "id": _json})},
)


@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    type_=st.sampled_from(["message.created", "message.updated.truncated", "thread.replied", "grant.expired", "x"]),
    payload=_payload,
)
def test_arbitrary_payloads_end_processed_or_ignored_and_never_crash(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, type_: str, payload: dict[str, Any]
) -> None:
    conn.execute("update flux_inboxes set status = 'active' where id = %s", [inbox_id])
    job = deliver(conn, Notification(id=f"ntf_{uuid.uuid4().hex}", type=type_, grant_id=GRANT, payload=payload))
    result = webhooks.process_webhook(conn, client, job)
    row = audit(conn, job)
    assert row["status"] == result.outcome.value
    assert (result.outcome is WebhookOutcome.IGNORED) == (row["error_message"] is not None)
