"""Thread sync: fetch one thread and all its messages from Nylas and write them, idempotently.

Outcomes other than success are ordinary events with their own terminal state: a thread deleted
at Nylas is *completed* with a note, an expired grant marks the inbox and fails the thread without
retrying. Transient errors propagate, so the actor retries them; `record_thread_failure` is
called when the last attempt failed.
"""

from __future__ import annotations

import enum
import time
from datetime import UTC, datetime

import attrs
import psycopg
from loguru import logger

from . import queries
from .errors import InvalidJob
from .jobs import ThreadSyncJob
from .nylas.client import NylasClient
from .nylas.errors import GrantExpired, NotFound
from .sync import upsert_thread_with_messages

__all__ = [
    "GRANT_EXPIRED_ERROR",
    "ThreadSyncOutcome",
    "ThreadSyncResult",
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
    ALREADY_COMPLETED = "already_completed"
    GRANT_EXPIRED = "grant_expired"


@attrs.frozen(kw_only=True)
class ThreadSyncResult:
    """What one thread sync did."""

    thread_id: str
    outcome: ThreadSyncOutcome
    messages: int = 0
    elapsed_ms: int = 0


def resolve_grant(conn: psycopg.Connection, job: ThreadSyncJob) -> tuple[str, str]:
    """The job's grant (looked up from the inbox when missing) and the inbox's status.

    Raises:
        InvalidJob: the inbox does not exist, or has no grant.
    """
    row = conn.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    if row is None:
        msg = f"Thread job for {job.thread_id!r} names inbox {job.inbox_id}, which does not exist"
        raise InvalidJob(msg)
    grant_id = job.grant_id or row[1]
    if not grant_id:
        msg = f"Thread job for {job.thread_id!r}: inbox {job.inbox_id} has no Nylas grant"
        raise InvalidJob(msg)
    return grant_id, row[2]


def mark_grant_expired(conn: psycopg.Connection, *, inbox_id: object = None, grant_id: str | None = None) -> bool:
    """Mark the inbox ``auth_expired`` (by id or grant); True when this call changed it."""
    row = conn.execute(queries.MARK_INBOX_AUTH_EXPIRED, {"inbox_id": inbox_id, "grant_id": grant_id}).fetchone()
    if row is not None:
        logger.bind(component="Grants").warning("Inbox {} marked auth_expired (grant {})", row[0], grant_id)
    return row is not None


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
    """Fetch a thread and every message of it (all pages) and upsert them; running it twice changes nothing.

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
    if tracked:
        row = conn.execute(queries.START_THREAD, _tracked(job)).fetchone()
        if row is not None and row[0] == "completed":
            return ThreadSyncResult(thread_id=job.thread_id, outcome=ThreadSyncOutcome.ALREADY_COMPLETED)

    fetched_at = datetime.now(UTC)
    try:
        thread = client.get_thread(grant_id, job.thread_id)
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
        upsert_thread_with_messages(conn, job.inbox_id, thread, messages, fetched_at=fetched_at)
        if tracked:
            conn.execute(queries.COMPLETE_THREAD, {**_tracked(job), "messages": len(messages), "note": None})
    elapsed_ms = int((time.monotonic() - started) * 1000)
    log.debug("Synced thread {} with {} messages in {} ms", job.thread_id, len(messages), elapsed_ms)
    return ThreadSyncResult(
        thread_id=job.thread_id, outcome=ThreadSyncOutcome.SYNCED, messages=len(messages), elapsed_ms=elapsed_ms
    )
