"""Fixtures for the operator commands: inboxes, backfills in a chosen state and dead letters, all written through
the SQL API or the broker's own functions, and a way to run a command as the CLI would."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attrs
import psycopg
import pytest
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from brokers.dead_letters import DeadLetterReason, dead_letter


@attrs.frozen
class Inbox:
    id: uuid.UUID
    grant_id: str
    email: str


@pytest.fixture
def make_inbox(conn: psycopg.Connection) -> Callable[[], Inbox]:
    """Factory: an inbox with a unique grant and address."""

    def make() -> Inbox:
        grant = f"grant-{uuid.uuid4().hex[:10]}"
        email = f"{grant}@inbox.example"
        row = conn.execute(
            "insert into flux_inboxes (nylas_grant_id, email, provider) values (%s, %s, 'google') returning id",
            [grant, email],
        ).fetchone()
        assert row is not None
        return Inbox(id=row[0], grant_id=grant, email=email)

    return make


@pytest.fixture
def inbox(make_inbox: Callable[[], Inbox]) -> Inbox:
    return make_inbox()


def queue_backfill(conn: psycopg.Connection, inbox: Inbox) -> uuid.UUID:
    """Queue a backfill the way any user would: through queue_inbox_backfill."""
    row = conn.execute("select config_id from queue_inbox_backfill(%s)", [inbox.id]).fetchone()
    assert row is not None
    config_id: uuid.UUID = row[0]
    return config_id


def add_threads(conn: psycopg.Connection, config_id: uuid.UUID, inbox: Inbox, statuses: dict[str, int]) -> None:
    """Track threads of a backfill in the given statuses (the stats triggers keep the counters)."""
    for status, count in statuses.items():
        conn.execute(
            "insert into queued_threads (config_id, inbox_id, nylas_thread_id, grant_id, status, messages_synced)"
            " select %s, %s, %s || n, %s, %s, case when %s = 'completed' then 3 else 0 end"
            " from generate_series(1, %s) n",
            [config_id, inbox.id, f"{status}-", inbox.grant_id, status, status, count],
        )


@pytest.fixture
def thread_sync_backfill(conn: psycopg.Connection, inbox: Inbox) -> uuid.UUID:
    """A backfill past its listing: 10 threads tracked, 4 completed, 1 failed, 1 processing, 4 queued."""
    config_id = queue_backfill(conn, inbox)
    conn.execute("select start_backfill_run(%s)", [config_id])
    conn.execute("select initialize_sync_stats(%s)", [config_id])
    add_threads(conn, config_id, inbox, {"completed": 4, "failed": 1, "processing": 1, "queued": 4})
    conn.execute("select transition_to_thread_sync(%s, 10)", [config_id])
    return config_id


@attrs.frozen
class _Delivery:
    msg_id: int
    last_read_at: datetime


def make_dead_letter(
    conn: psycopg.Connection, queue: str, body: dict[str, Any], *, error: str = "boom", actor: str = "sync_thread"
) -> None:
    """Put `body` on `queue`, take it as a worker does, and dead-letter that delivery through the broker's own
    function, as a failed actor would."""
    conn.execute("select pgmq.send(%s, %s)", [queue, Jsonb(body)])
    # The delivery's lease (last_read_at) is the token dead_letter checks; a message with this body, not the oldest.
    with conn.cursor(row_factory=class_row(_Delivery)) as cur:
        delivery = cur.execute(
            "select msg_id, last_read_at from pgmq.read(%s, 60, 1, %s)", [queue, Jsonb(body)]
        ).fetchone()
    assert delivery is not None
    recorded = dead_letter(
        conn,
        queue_name=queue,
        msg_id=delivery.msg_id,
        token=delivery.last_read_at,
        message=None,
        message_id=str(uuid.uuid4()),
        actor_name=actor,
        why=DeadLetterReason(
            reason="failed", error_type="RuntimeError", error_message=error, traceback="Traceback: boom", attempts=4
        ),
    )
    assert recorded


def parse(add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with a command's own options, as the nova-email parser does for that subcommand."""
    parser = argparse.ArgumentParser(prog="nova-email")
    add_arguments(parser)
    return parser.parse_args(argv)
