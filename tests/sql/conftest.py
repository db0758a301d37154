"""Fixtures for the SQL API tests: inboxes and configurations created through plain inserts, and a helper that
runs a function on several connections at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import psycopg
import pytest
from psycopg import sql

T = TypeVar("T")


@attrs.frozen
class Inbox:
    """An inbox row and its grant."""

    id: uuid.UUID
    grant_id: str


@pytest.fixture
def make_inbox(conn: psycopg.Connection) -> Callable[..., Inbox]:
    """Factory: insert an inbox with a unique grant id."""

    def make(grant_id: str | None = None) -> Inbox:
        grant = grant_id or f"grant-{uuid.uuid4().hex[:12]}"
        row = conn.execute(
            "insert into flux_inboxes (nylas_grant_id, email, provider) values (%s, %s, 'google') returning id",
            (grant, f"{grant}@example.org"),
        ).fetchone()
        assert row is not None
        return Inbox(id=row[0], grant_id=grant)

    return make


@pytest.fixture
def inbox(make_inbox: Callable[..., Inbox]) -> Inbox:
    """One inbox."""
    return make_inbox()


@pytest.fixture
def config_id(conn: psycopg.Connection, inbox: Inbox) -> uuid.UUID:
    """The inbox's configuration, in thread_sync as if a backfill had listed its pages."""
    row = conn.execute(
        "insert into flux_inbox_configurations (inbox_id, backfill_status) values (%s, 'thread_sync') returning id",
        (inbox.id,),
    ).fetchone()
    assert row is not None
    return row[0]


def run_concurrently(db_url: str, count: int, work: Callable[[psycopg.Connection, int], T]) -> list[T]:
    """Run `work(conn, index)` on `count` threads, each with its own autocommit connection, released together.

    Exceptions are re-raised in the caller so a failing worker fails the test.
    """
    connections = [psycopg.connect(db_url, autocommit=True) for _ in range(count)]
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = work(connections[index], index)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a concurrent worker did not finish within 60 s"
    finally:
        for connection in connections:
            connection.close()
    if errors:
        raise errors[0]
    return results


def queue_messages(conn: psycopg.Connection, queue: str) -> list[dict[str, Any]]:
    """Every message on a service queue, oldest first (read straight from the queue table, nothing is consumed)."""
    assert queue in {"nylas_webhook_notifications", "inbox_backfill_jobs", "thread_sync_jobs"}
    query = sql.SQL("select message from pgmq.{} order by msg_id").format(sql.Identifier(f"q_{queue}"))
    rows = conn.execute(query).fetchall()
    return [row[0] for row in rows]
