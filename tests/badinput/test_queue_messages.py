"""Any JSON on any of the three queues ends processed or dead-lettered with a reason, and the queue keeps moving.

Messages are sent the way SQL producers send them (``pgmq.send`` of a JSON value), to a real worker process.
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


def drain_and_check(conn: psycopg.Connection[Any], target: Target, queue: str, msg_ids: list[int]) -> None:
    """Wait for `queue` to empty; every dead letter among `msg_ids` has a reason and a message; workers alive."""
    wait_for(lambda: queue_depths(conn)[queue] == 0, timeout_s=40, interval_s=0.1, what=f"{queue} to drain")
    rows = conn.execute(
        "select msg_id, reason, error_type, error_message from pgmq_broker.dead_letters"
        " where queue_name = %s and msg_id = any(%s)",
        [queue, msg_ids],
    ).fetchall()
    for msg_id, reason, error_type, error_message in rows:
        assert reason and error_type and error_message, (msg_id, reason, error_type, error_message)
    assert target.workers.process.poll() is None, target.workers.log()[-3000:]


def sentinel_syncs(conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID) -> None:
    """A good thread job after the bad ones is still done: the thread queue keeps moving."""
    thread_id = target.thread_ids[0]
    conn.execute("delete from flux_email_threads where nylas_thread_id = %s", [thread_id])
    send(conn, "thread_sync_jobs", {"thread_id": thread_id, "inbox_id": str(inbox), "grant_id": GRANT})

    def stored() -> bool:
        row = conn.execute("select count(*) from flux_email_threads where nylas_thread_id = %s", [thread_id]).fetchone()
        return row == (1,)

    wait_for(stored, timeout_s=20, interval_s=0.1, what="the good thread job after the bad ones")


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("queue", WORK_QUEUES)
def test_any_json_on_a_queue_ends_processed_or_dead_lettered_with_a_reason(
    conn: psycopg.Connection[Any], target: Target, inbox: uuid.UUID, queue: str
) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(queue_message(queue), min_size=1, max_size=12))
    def check(messages: list[Any]) -> None:
        msg_ids = [send(conn, queue, message) for message in messages]
        SENT[queue] += len(messages)
        drain_and_check(conn, target, queue, msg_ids)

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
    drain_and_check(conn, target, queue, msg_ids)
    dead = conn.execute(
        "select count(*) from pgmq_broker.dead_letters where queue_name = %s and msg_id = any(%s)", [queue, msg_ids]
    ).fetchone()
    # Only the empty object on the backfill queue could pass as "nothing to do"; every other one is refused
    assert dead is not None and dead[0] >= len(msg_ids) - 1
    sentinel_syncs(conn, target, inbox)
    print(f"\n[badinput] queue messages sent so far: {SENT}")
