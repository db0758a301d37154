"""The dead-letter store: messages the broker gave up on, with the reason, never consumed.

A message is dead-lettered when its actor failed for good (Dramatiq nacks it after Retries gave up, or on a
``throws`` exception), when its body cannot be decoded, when no actor can take it, or when it was delivered
``max_deliveries`` times without being settled (a poison message that kills its worker). The record and the
delete from the queue happen in one transaction (``pgmq_broker.dead_letter``). Replaying sends the message
back to its queue with a fresh retry budget and removes the record, also in one transaction.

The functions take a connection, so they can run inside a caller's transaction; :class:`~brokers.PGMQBroker`
wraps them with its pool (``dead_letters``, ``count_dead_letters``, ``purge_dead_letters``,
``replay_dead_letters``).
"""

from __future__ import annotations

import traceback
from datetime import datetime
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from . import queries
from .database import fetch_scalar

__all__ = [
    "DeadLetter",
    "DeadLetterReason",
    "count_dead_letters",
    "dead_letter",
    "list_dead_letters",
    "purge_dead_letters",
    "reason_from_exception",
    "replay_dead_letters",
]


@attrs.frozen(kw_only=True)
class DeadLetterReason:
    """Why a message is being dead-lettered.

    ``reason`` is one of ``failed`` (the actor raised and will not be retried), ``unknown_actor``,
    ``undecodable``, ``no_handler`` or ``max_deliveries``.
    """

    reason: str
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    attempts: int = 1


@attrs.frozen(kw_only=True)
class DeadLetter:
    """One row of ``pgmq_broker.dead_letters``."""

    id: int
    queue_name: str
    msg_id: int | None
    message_id: str | None
    actor_name: str | None
    message: Any
    reason: str
    error_type: str | None
    error_message: str | None
    traceback: str | None
    attempts: int
    enqueued_at: datetime | None
    dead_at: datetime


def reason_from_exception(exc: BaseException | None, *, attempts: int, reason: str = "failed") -> DeadLetterReason:
    """Describe an actor's exception (type, message, traceback) as a dead-letter reason."""
    if exc is None:
        return DeadLetterReason(reason=reason, attempts=attempts)
    return DeadLetterReason(
        reason=reason,
        error_type=type(exc).__name__,
        error_message=str(exc),
        traceback="".join(traceback.format_exception(exc, limit=30)),
        attempts=attempts,
    )


def dead_letter(
    conn: psycopg.Connection,
    *,
    queue_name: str,
    msg_id: int,
    token: datetime,
    message: str | None,
    message_id: str | None,
    actor_name: str | None,
    why: DeadLetterReason,
) -> bool:
    """Record one delivery as a dead letter and delete it from its queue, atomically.

    The delivery is `msg_id` as fetched with lease `token` (its ``last_read_at``). `message` is the encoded
    envelope to keep (None keeps the body as it is in the queue). Returns False, recording nothing, when that
    delivery no longer holds the message (its lease lapsed and another worker took it, or it is gone).
    """
    recorded = fetch_scalar(
        conn,
        queries.DEAD_LETTER,
        {
            "queue": queue_name,
            "msg_id": msg_id,
            "token": token,
            "message": message,
            "message_id": message_id,
            "actor_name": actor_name,
            "reason": why.reason,
            "error_type": why.error_type,
            "error_message": why.error_message,
            "traceback": why.traceback,
            "attempts": why.attempts,
        },
    )
    return bool(recorded)


def list_dead_letters(conn: psycopg.Connection, *, queue_name: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest `limit` dead letters, of one queue or of all."""
    with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        return cur.execute(queries.LIST_DEAD_LETTERS, {"queue": queue_name, "limit": limit}).fetchall()


def count_dead_letters(conn: psycopg.Connection, *, queue_name: str | None = None) -> int:
    """How many dead letters there are, of one queue or of all."""
    return int(fetch_scalar(conn, queries.COUNT_DEAD_LETTERS, {"queue": queue_name}))


def purge_dead_letters(
    conn: psycopg.Connection, *, queue_name: str | None = None, older_than_s: int | None = None
) -> int:
    """Delete dead letters (of one queue, older than `older_than_s`, or all); returns how many."""
    return conn.execute(queries.PURGE_DEAD_LETTERS, {"queue": queue_name, "older_than_s": older_than_s}).rowcount


def replay_dead_letters(
    conn: psycopg.Connection,
    *,
    queue_name: str | None = None,
    ids: list[int] | None = None,
    limit: int | None = None,
) -> int:
    """Send dead letters back to their queues with a fresh retry budget; returns how many were replayed.

    Use it once the cause is fixed (a deployed bug fix, a restored dependency). The messages keep their
    message ids; ``options.retries`` and ``options.traceback`` are cleared.
    """
    return int(fetch_scalar(conn, queries.REPLAY_DEAD_LETTERS, {"queue": queue_name, "ids": ids, "limit": limit}))
