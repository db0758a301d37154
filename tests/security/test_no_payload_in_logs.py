"""No email content in logs: a webhook job whose processing fails is logged by its actor, message id and ids, never
by its payload, in a real worker process."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dramatiq import Message

from nova_email.message_logging import MessagePayloadFilter, summarize_message
from tests.chaos.scenario import SHORT_RETRY_WINDOWS_MS
from tests.processes import running_workers, wait_for

#: Stands for a subject, a body and a password-reset code: it must not reach any log line.
CANARY = "canary-" + uuid.uuid4().hex
GRANT = "grant-canary"


def _nylas_notification(webhook_id: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": "message.created",
        "id": webhook_id,
        "data": {
            "application_id": "app-1",
            "object": {
                "object": "message",
                "id": "msg-canary",
                "grant_id": GRANT,
                "thread_id": "thread-canary",
                "subject": f"Your reset code {CANARY}",
                "body": f"<p>{CANARY}</p>",
            },
        },
    }


def test_a_message_is_summarized_by_actor_id_and_job_ids() -> None:
    message = Message(
        queue_name="q",
        actor_name="process_webhook",
        args=({"grant_id": GRANT, "notification_id": "n-1", "payload": {"subject": CANARY}},),
        kwargs={},
        options={},
    )
    record = logging.LogRecord(
        "dramatiq.worker.WorkerThread", logging.ERROR, __file__, 1, "Failed %s", (message,), None
    )

    MessagePayloadFilter().filter(record)

    assert record.getMessage() == f"Failed {summarize_message(message)}"
    assert CANARY not in record.getMessage()
    assert f"process_webhook[{message.message_id}]" in record.getMessage()
    assert f"grant_id={GRANT}" in record.getMessage() and "notification_id=n-1" in record.getMessage()


@pytest.mark.slow
@pytest.mark.processes
def test_a_failing_webhook_never_logs_its_payload(db_url: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    # Given an inbox and a webhook about it whose processing fails (Nylas cannot be reached) on every attempt
    conn.execute("insert into flux_inboxes (nylas_grant_id) values (%s)", [GRANT])
    webhook_id = "ntf-" + uuid.uuid4().hex
    row = conn.execute(
        "select notification_id from queue_nylas_webhook_notification(%s, %s, %s, %s)",
        [webhook_id, "message.created", None, json.dumps(_nylas_notification(webhook_id))],
    ).fetchone()
    assert row is not None
    env = {
        "DATABASE_URL": db_url,
        "NYLAS_API_URI": "http://127.0.0.1:1",
        "NYLAS_API_KEY": "key-for-a-closed-port",
        "NYLAS_TIMEOUT_S": "1",
        "NYLAS_GRANT_RATE": "0",
        "LOG_LEVEL": "info",
        # Three attempts within seconds, not the default two-minute window
        **SHORT_RETRY_WINDOWS_MS,
    }
    # When workers try it until they give up
    with running_workers(env, tmp_path / "workers.log", queues=["nylas_webhook_notifications"]) as workers:
        wait_for(
            lambda: "Retries exceeded" in workers.log(),
            timeout_s=90,
            what="the webhook's attempts to run out",
        )
        log = workers.log()
    # Then each failure was logged, naming the actor, the message and its ids, but the payload never
    assert "Failed to process message process_webhook[" in log, log[-3000:]
    assert f"grant_id={GRANT}" in log or f"notification_id={row[0]}" in log
    assert CANARY not in log
