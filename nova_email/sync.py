"""Writing Nylas threads and messages into the mirror tables.

The SQL functions of ``nova_email/sql/040_sync_api.sql`` do the work in two statements whatever the size of
the thread; this module hands them the objects as Nylas-shaped JSON. Every write is an upsert
keyed by the Nylas id and versioned by the time of the read, so running it twice changes nothing
and an older read never overwrites a newer one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import queries
from .nylas.models import Message, Thread, to_json

__all__ = ["nylas_json", "upsert_messages", "upsert_thread", "upsert_thread_with_messages"]


def _compact(value: Any) -> Any:
    """JSON without null members, as Nylas itself omits absent optional fields."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def nylas_json(value: Thread | Message) -> Any:
    """A model as the Nylas-shaped JSON the SQL functions read (absent optional fields omitted)."""
    return _compact(to_json(value))


def upsert_thread(conn: psycopg.Connection, inbox_id: uuid.UUID, thread: Thread, *, fetched_at: datetime) -> uuid.UUID:
    """Insert or update one thread's metadata; returns its row id."""
    row = conn.execute(
        queries.UPSERT_THREAD,
        {"inbox_id": inbox_id, "thread": Jsonb(nylas_json(thread)), "fetched_at": fetched_at},
    ).fetchone()
    assert row is not None  # the function always returns the row id
    thread_row_id: uuid.UUID = row[0]
    return thread_row_id


def upsert_messages(
    conn: psycopg.Connection,
    inbox_id: uuid.UUID,
    thread_row_id: uuid.UUID,
    messages: Sequence[Message],
    *,
    fetched_at: datetime,
) -> int:
    """Insert or update messages of one thread; returns how many rows were written."""
    if not messages:
        return 0
    row = conn.execute(
        queries.UPSERT_MESSAGES,
        {
            "inbox_id": inbox_id,
            "thread_row_id": thread_row_id,
            "messages": Jsonb([nylas_json(message) for message in messages]),
            "fetched_at": fetched_at,
        },
    ).fetchone()
    return int(row[0]) if row is not None else 0


def upsert_thread_with_messages(
    conn: psycopg.Connection,
    inbox_id: uuid.UUID,
    thread: Thread,
    messages: Sequence[Message],
    *,
    fetched_at: datetime,
    messages_fetched_at: datetime | None = None,
) -> uuid.UUID:
    """Write a thread and its messages in one transaction; returns the thread's row id.

    ``fetched_at`` is when the thread was read, ``messages_fetched_at`` when the messages were (by default the same).
    """
    with conn.transaction():
        thread_row_id = upsert_thread(conn, inbox_id, thread, fetched_at=fetched_at)
        upsert_messages(conn, inbox_id, thread_row_id, messages, fetched_at=messages_fetched_at or fetched_at)
    return thread_row_id
