"""Thread sync: fetch one thread's messages (and the thread when needed) from Nylas and write them, idempotently.

A backfill's listing kept each thread as Nylas listed it, so a thread job of a backfill fetches only the messages:
one call for a thread of up to 200 messages. The listed copy is written only when the messages just fetched show it
is current (the same messages, the same flags and folders); otherwise, and for jobs without a listed copy
(``queue_thread_sync()`` callers, recovery), the thread is fetched too. Every write is versioned by when its object
was read, so a newer copy (a webhook's) is never overwritten by the older listing. The messages cannot show a draft
saved after the listing (Nylas lists drafts apart, sends no webhook for them and moves no thread date), so such a
thread is written as listed, without it; the next backfill sees ``has_drafts`` differ and syncs it (README).

Outcomes other than success are ordinary events with their own terminal state: a thread deleted
at Nylas is *completed* with a note, an expired grant marks the inbox and fails the thread without
retrying. Transient errors propagate, so the actor retries them; `record_thread_failure` is
called when the last attempt failed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
from loguru import logger
from psycopg.rows import class_row, scalar_row

from . import queries
from .errors import InvalidJob
from .jobs import ThreadSyncJob
from .nylas.client import NylasClient
from .nylas.errors import GrantExpired, NotFound, ResponseShapeError
from .nylas.models import Message, Thread, structure
from .sync import upsert_thread_with_messages

__all__ = [
    "GRANT_EXPIRED_ERROR",
    "ThreadSyncOutcome",
    "ThreadSyncResult",
    "listed_copy_is_current",
    "mark_grant_expired",
    "record_thread_failure",
    "release_thread",
    "resolve_grant",
    "sync_thread",
]

log = logger.bind(component="ThreadSync")

#: The error recorded on threads that stopped because their inbox lost its grant.
GRANT_EXPIRED_ERROR = "grant expired: the inbox is auth_expired; re-authenticate it and start a new backfill"
#: The note on threads that Nylas no longer has.
DELETED_NOTE = "thread deleted at Nylas"


class ThreadSyncOutcome(enum.StrEnum):
    SYNCED = "synced"
    DELETED = "deleted"
    GRANT_EXPIRED = "grant_expired"


@attrs.frozen(kw_only=True)
class ThreadSyncResult:
    """What one thread sync did; ``thread_fetched`` is False when the listed copy was written instead."""

    thread_id: str
    outcome: ThreadSyncOutcome
    messages: int = 0
    thread_fetched: bool = False
    elapsed_ms: int = 0


@attrs.frozen(kw_only=True)
class TrackedThread:
    """A backfill's ``queued_threads`` row as a thread job claims it: its status before, and the listed copy."""

    status: str
    listed_thread: dict[str, Any] | None
    listed_at: datetime | None


def listed_copy_is_current(listed: Thread, messages: Sequence[Message]) -> bool:
    """Whether a listed thread still describes the messages just fetched from Nylas.

    Only what the messages show is compared: the same message ids, and the thread's ``unread``, ``starred`` and
    ``folders`` as Nylas derives them from its messages. A thread with drafts is never taken from the listing: listed
    with drafts, or with a draft among the messages (providers that list drafts there show one saved since).
    """
    if listed.has_drafts or listed.draft_ids or any(m.object == "draft" or "DRAFT" in m.folders for m in messages):
        return False
    if sorted(listed.message_ids) != sorted(m.id for m in messages):
        return False
    return (
        listed.unread == any(m.unread for m in messages)
        and listed.starred == any(m.starred for m in messages)
        and set(listed.folders) == {folder for m in messages for folder in m.folders}
    )


def resolve_grant(conn: psycopg.Connection, job: ThreadSyncJob) -> tuple[str, str]:
    """The job's grant (looked up from the inbox when missing) and the inbox's status.

    Raises:
        InvalidJob: the inbox does not exist, or has no grant.
    """
    with conn.cursor(row_factory=class_row(queries.Inbox)) as cur:
        inbox = cur.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    if inbox is None:
        msg = f"Thread job for {job.thread_id!r} names inbox {job.inbox_id}, which does not exist"
        raise InvalidJob(msg)
    grant_id = job.grant_id or inbox.nylas_grant_id
    if not grant_id:
        msg = f"Thread job for {job.thread_id!r}: inbox {job.inbox_id} has no Nylas grant"
        raise InvalidJob(msg)
    return grant_id, inbox.status


def mark_grant_expired(conn: psycopg.Connection, *, inbox_id: object = None, grant_id: str | None = None) -> bool:
    """Mark the inbox ``auth_expired`` (by id or grant); True when this call changed it."""
    with conn.cursor(row_factory=scalar_row) as cur:
        marked = cur.execute(queries.MARK_INBOX_AUTH_EXPIRED, {"inbox_id": inbox_id, "grant_id": grant_id}).fetchone()
    if marked is not None:
        logger.bind(component="Grants").warning("Inbox {} marked auth_expired (grant {})", marked, grant_id)
    return marked is not None


def _tracked(job: ThreadSyncJob) -> dict[str, object]:
    return {"config_id": job.config_id, "thread_id": job.thread_id}


def record_thread_failure(conn: psycopg.Connection, job: ThreadSyncJob, error: str) -> None:
    """The last attempt failed: the tracked thread becomes ``failed`` with the error, so completion can be reached."""
    if job.config_id is not None:
        conn.execute(queries.FAIL_THREAD, {**_tracked(job), "error": error[:2000]})
    log.error("Thread {} failed for good: {}", job.thread_id, error)


def release_thread(conn: psycopg.Connection, job: ThreadSyncJob) -> None:
    """The job was re-scheduled (rate limited): the tracked thread goes back to ``queued`` meanwhile."""
    if job.config_id is not None:
        conn.execute(queries.REQUEUE_THREAD, _tracked(job))


def sync_thread(conn: psycopg.Connection, client: NylasClient, job: ThreadSyncJob) -> ThreadSyncResult:
    """Fetch every message of a thread (all pages), and the thread unless its listed copy is current; upsert them.

    Running it twice changes nothing. A job for a thread its backfill already completed runs too: it is a
    redelivery or a ``queue_thread_sync()`` call, and either asks for the thread as Nylas has it now.

    Raises:
        InvalidJob: the job names an unknown inbox.
        RateLimited, ServerError, NylasConnectionError: transient; retry the job.
    """
    started = time.monotonic()
    grant_id, inbox_status = resolve_grant(conn, job)
    tracked = job.config_id is not None
    if inbox_status == "auth_expired":
        record_thread_failure(conn, job, GRANT_EXPIRED_ERROR)
        return ThreadSyncResult(thread_id=job.thread_id, outcome=ThreadSyncOutcome.GRANT_EXPIRED)
    claimed = _claim(conn, job) if tracked else None

    try:
        messages_read_at = datetime.now(UTC)
        messages = list(client.iter_thread_messages(grant_id, job.thread_id))
        listed = _listed_copy(claimed, grant_id)
        if listed is not None and listed_copy_is_current(listed[0], messages):
            thread, thread_read_at = listed
        else:
            if listed is not None:
                log.debug("Thread {} changed at Nylas since it was listed; fetching it", job.thread_id)
            # Taken before the read: the version stamp must not be newer than the state it labels.
            thread_read_at = datetime.now(UTC)
            thread = client.get_thread(grant_id, job.thread_id)
            if not set(thread.message_ids) <= {m.id for m in messages}:
                # Mail arrived between the two reads: the thread row must name no message the mirror lacks.
                messages_read_at = datetime.now(UTC)
                messages = list(client.iter_thread_messages(grant_id, job.thread_id))
    except NotFound:
        if tracked:
            conn.execute(queries.COMPLETE_THREAD, {**_tracked(job), "messages": 0, "note": DELETED_NOTE})
        log.info("Thread {} is gone at Nylas; marked completed", job.thread_id)
        return ThreadSyncResult(thread_id=job.thread_id, outcome=ThreadSyncOutcome.DELETED)
    except GrantExpired:
        mark_grant_expired(conn, inbox_id=job.inbox_id, grant_id=grant_id)
        record_thread_failure(conn, job, GRANT_EXPIRED_ERROR)
        return ThreadSyncResult(thread_id=job.thread_id, outcome=ThreadSyncOutcome.GRANT_EXPIRED)

    with conn.transaction():
        upsert_thread_with_messages(
            conn, job.inbox_id, thread, messages, fetched_at=thread_read_at, messages_fetched_at=messages_read_at
        )
        if tracked:
            conn.execute(queries.COMPLETE_THREAD, {**_tracked(job), "messages": len(messages), "note": None})
    elapsed_ms = int((time.monotonic() - started) * 1000)
    log.debug("Synced thread {} with {} messages in {} ms", job.thread_id, len(messages), elapsed_ms)
    return ThreadSyncResult(
        thread_id=job.thread_id,
        outcome=ThreadSyncOutcome.SYNCED,
        messages=len(messages),
        thread_fetched=listed is None or thread is not listed[0],
        elapsed_ms=elapsed_ms,
    )


def _claim(conn: psycopg.Connection, job: ThreadSyncJob) -> TrackedThread | None:
    with conn.cursor(row_factory=class_row(TrackedThread)) as cur:
        return cur.execute(queries.START_THREAD, _tracked(job)).fetchone()


def _listed_copy(claimed: TrackedThread | None, grant_id: str) -> tuple[Thread, datetime] | None:
    """The thread as the listing kept it and when that page was read; None when there is none or it cannot be read
    (then the thread is fetched)."""
    if claimed is None or claimed.listed_thread is None or claimed.listed_at is None:
        return None
    try:
        thread = structure(claimed.listed_thread, Thread, where="$.listed_thread", grant_id=grant_id)
    except ResponseShapeError as exc:
        log.warning("Listed copy of a thread is unreadable ({}); fetching the thread", exc)
        return None
    return thread, claimed.listed_at
