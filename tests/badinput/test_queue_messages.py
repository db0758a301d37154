"""Any JSON on any of the three queues ends dead-lettered with a reason or with its outcome recorded, and the queue
keeps moving.

Messages are sent the way SQL producers send them (``pgmq.send`` of a JSON value), to a real worker process. "Its
outcome recorded" means where an operator would look: the webhook's audit row, the backfill's configuration, the
thread's ``queued_threads`` row or the stored thread. A message that ends with neither was acknowledged silently.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from tests.badinput.conftest import GRANT, Target
from tests.badinput.strategies import queue_message
from tests.chaos.scenario import WORK_QUEUES, queue_depths
from tests.processes import wait_for

#: Inputs sent across the module's examples (reported by the last test).
SENT: dict[str, int] = dict.fromkeys(WORK_QUEUES, 0)


def send(conn: psycopg.Connection[Any], queue: str, message: Any) -> int:
    row = conn.execute("select pgmq.send(%s, %s)", [queue, Jsonb(message)]).fetchone()
    assert row is not None
    return int(row[0])


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and "\x00" not in value else None


def recorded_outcome(conn: psycopg.Connection[Any], queue: str, message: Any) -> str | None:
    """Where `message`'s outcome was recorded, if anywhere: a settled audit row, configuration or thread."""
    if not isinstance(message, dict):
        return None
    if queue == "nylas_webhook_notifications":
        row = conn.execute(
            "select status from flux_webhook_notifications where id::text = %s"
            " and status in ('processed', 'ignored', 'error')",
            [_text(message.get("notification_id"))],
        ).fetchone()
    elif queue == "inbox_backfill_jobs":
        row = conn.execute(
            "select backfill_status from flux_inbox_configurations where id::text = %s and backfill_status <> 'pending'",
            [_text(message.get("config_id"))],
        ).fetchone()
    else:
        row = conn.execute(
            "select status from queued_threads where config_id::text = %s and nylas_thread_id = %s"
            " and status in ('completed', 'failed')"
            " union all select 'stored' from flux_email_threads where inbox_id::text = %s and nylas_thread_id = %s",
            [_text(message.get(key)) for key in ("config_id", "thread_id", "inbox_id", "thread_id")],
        ).fetchone()
    return None if row is None else f"{queue}: {row[0]}"


def drain_and_check(
    conn: psycopg.Connection[Any], target: Target, queue: str, sent: dict[int, Any] | list[int]
) -> dict[int, str]:
    """Wait for `queue` to empty; then each sent message (msg_id -> JSON, or only ids: must be dead-lettered) was
    dead-lettered with a reason, type and message, or has its outcome recorded; the workers are alive.

    Returns how each message ended.
    """
    wait_for(lambda: queue_depths(conn)[queue] == 0, timeout_s=40, interval_s=0.1, what=f"{queue} to drain")
    rows = conn.execute(
        "select msg_id, reason, error_type, error_message from pgmq_broker.dead_letters"
        " where queue_name = %s and msg_id = any(%s)",
        [queue, list(sent)],
    ).fetchall()
    ended: dict[int, str] = {}
    for msg_id, reason, error_type, error_message in rows:
        assert reason and error_type and error_message, (msg_id, reason, error_type, error_message)
        ended[msg_id] = f"dead-lettered: {reason}"
    for msg_id in sent:
        if msg_id in ended:
            continue
        message = sent[msg_id] if isinstance(sent, dict) else None
        outcome = recorded_outcome(conn, queue, message)
        assert outcome is not None, f"message {msg_id} was acknowledged with nothing recorded: {message!r:.500}"
        ended[msg_id] = outcome
    assert target.workers.process.poll() is None, target.workers.log()[-3000:]
    return ended


def sentinel_syncs(conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID) -> None:
    """A good thread job after the bad ones is still done: the thread queue keeps moving."""
    thread_id = target.thread_ids[0]
    conn.execute("delete from flux_email_threads where nylas_thread_id = %s", [thread_id])
    message = {"thread_id": thread_id, "inbox_id": str(inbox), "grant_id": GRANT}
    send(conn, "thread_sync_jobs", message)

    def stored() -> bool:
        row = conn.execute("select count(*) from flux_email_threads where nylas_thread_id = %s", [thread_id]).fetchone()
        return row == (1,)

    wait_for(stored, timeout_s=20, interval_s=0.1, what="the good thread job after the bad ones")
    assert recorded_outcome(conn, "thread_sync_jobs", message) == "thread_sync_jobs: stored"


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("queue", WORK_QUEUES)
def test_any_json_on_a_queue_ends_dead_lettered_with_a_reason_or_with_its_outcome_recorded(
    conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID, queue: str
) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(queue_message(queue), min_size=1, max_size=12))
    def check(messages: list[Any]) -> None:
        sent = {send(conn, queue, message): message for message in messages}
        SENT[queue] += len(messages)
        drain_and_check(conn, target, queue, sent)

    check()
    sentinel_syncs(conn, target, inbox)


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


#: Shapes hypothesis rarely reaches, as JSON text: the smallest non-objects, huge bodies, nesting around Python's
#: recursion limit (Postgres stores them; the worker's JSON decoder is what they test).
EXTREMES = {
    "null": "null",
    "empty-object": "{}",
    "empty-string": '""',
    "array-of-jobs": json.dumps([{"thread_id": "t", "inbox_id": str(uuid.uuid4())}]),
    "huge-string-field": json.dumps({"thread_id": "x" * 5_000_000, "inbox_id": str(uuid.uuid4())}),
    "huge-payload": json.dumps({"notification_type": "message.created", "payload": {"data": ["y" * 1000] * 5000}}),
    "deep-object-500": _nested(500),
    "deep-array-990": "[" * 990 + "]" * 990,
    "deep-payload-995": '{"notification_type": "message.created", "payload": ' + _nested(995) + "}",
    "deep-object-5000": _nested(5000),
    "big-integers": json.dumps({"thread_id": 10**40, "inbox_id": -(10**40)}),
    "nul-escape-text": json.dumps({"thread_id": "a\\u0000b", "inbox_id": "\\u0000"}),
}


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("queue", WORK_QUEUES)
def test_extreme_messages_are_dead_lettered_with_a_reason_and_the_queue_keeps_moving(
    conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID, queue: str
) -> None:
    msg_ids = []
    for text in EXTREMES.values():
        row = conn.execute("select pgmq.send(%s, %s::jsonb)", [queue, text]).fetchone()
        assert row is not None
        msg_ids.append(int(row[0]))
    SENT[queue] += len(msg_ids)
    # None of them names anything that exists, so none can have a recorded outcome: each one is dead-lettered
    ended = drain_and_check(conn, target, queue, msg_ids)
    assert all(how.startswith("dead-lettered") for how in ended.values()), ended
    sentinel_syncs(conn, target, inbox)
    print(f"\n[badinput] queue messages sent so far: {SENT}")
