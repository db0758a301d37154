"""Webhook processing: apply one Nylas webhook event to the mirror.

The webhook body is never trusted as data: it may be truncated, transformed, stale or mislabelled
(docs/nylas-v3.md, e). Only the ids are read from it; the objects are fetched from Nylas, so
duplicate and out-of-order deliveries converge on the current state. Routing is by base type,
so ``message.created.truncated`` and friends follow ``message.created``. An event on a thread the
mirror does not hold yet pulls in the whole thread. Events that cannot apply (an unhandled type, an
unknown grant, an object gone at Nylas, an ``auth_expired`` inbox) end ``ignored`` with the reason.

Every attempt is recorded on the audit row through ``acknowledge_webhook_notification``. A job with
no audit row (not made by ``queue_nylas_webhook_notification``) is an ``InvalidJob``: its outcome
could be recorded nowhere, so it is dead-lettered with the reason instead of being applied unseen.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
from loguru import logger

from . import queries
from .errors import InvalidJob
from .jobs import WebhookJob
from .nylas.client import NylasClient
from .nylas.errors import GrantExpired, NotFound, RateLimited
from .nylas.models import Message
from .sync import upsert_thread_with_messages
from .thread_sync import mark_grant_expired

__all__ = ["WebhookOutcome", "WebhookResult", "process_webhook", "record_webhook_error"]

log = logger.bind(component="Webhooks")


class WebhookOutcome(enum.StrEnum):
    """The audit row's final status for an event that did not fail."""

    PROCESSED = "processed"
    IGNORED = "ignored"


@attrs.frozen(kw_only=True)
class WebhookResult:
    """How an event ended and why (the reason lands in the audit row's error_message when ignored)."""

    outcome: WebhookOutcome
    reason: str | None = None
    duration_ms: int = 0


class _Ignored(Exception):
    """The event cannot or need not be applied; recorded as ``ignored`` with this reason."""


def _object(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    return obj if isinstance(obj, Mapping) else {}


def _first_string(*candidates: object) -> str | None:
    """The first candidate that can be a Nylas id."""
    for candidate in candidates:
        # "." and ".." would be resolved away as URL path segments and fetch a list instead of the object.
        if isinstance(candidate, str) and candidate.strip() and candidate.strip("."):
            return candidate
    return None


def _message_id(job: WebhookJob) -> str:
    payload = job.payload
    data = payload.get("data") if isinstance(payload.get("data"), Mapping) else {}
    obj = payload.get("object") if isinstance(payload.get("object"), Mapping) else {}
    # The original's last resort, the top-level "id", is the v3 envelope's notification id: never a message's.
    top = payload.get("id") if payload.get("id") != job.webhook_id else None
    found = _first_string(_object(payload).get("id"), data.get("id"), obj.get("id"), top)  # type: ignore[union-attr]
    if found is None:
        msg = "message id missing from the payload (looked at data.object.id, data.id, object.id, id)"
        raise _Ignored(msg)
    return found


def _grant_of(job: WebhookJob) -> str | None:
    return job.grant_id or _first_string(_object(job.payload).get("grant_id"))


def _resolve_inbox(conn: psycopg.Connection, job: WebhookJob) -> tuple[uuid.UUID, str, str]:
    grant_id = _grant_of(job)
    if job.inbox_id is not None:
        row = conn.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    elif grant_id:
        row = conn.execute(queries.GET_INBOX_BY_GRANT, {"grant_id": grant_id}).fetchone()
    else:
        msg = "no grant id in the job or the payload (looked at grant_id, data.object.grant_id)"
        raise _Ignored(msg)
    if row is None:
        msg = f"no inbox has grant {grant_id!r}; connect the inbox first, later events will then apply"
        raise _Ignored(msg)
    # The inbox's own grant (never null) is the one to call Nylas with; the payload's only found the inbox.
    return row[0], row[1], row[2]


def _store_thread(
    conn: psycopg.Connection,
    client: NylasClient,
    inbox_id: uuid.UUID,
    grant_id: str,
    thread_id: str,
    messages: Sequence[Message],
    *,
    fetched_at: datetime,
) -> None:
    """Write the thread's metadata and `messages`; a thread we do not hold yet comes with all its messages."""
    try:
        thread = client.get_thread(grant_id, thread_id)
        known = conn.execute(queries.THREAD_ROW_ID, {"inbox_id": inbox_id, "thread_id": thread_id}).fetchone()
        if known is None:
            # A thread row without its messages would look current to the next backfill, which would skip it.
            messages = list(client.iter_thread_messages(grant_id, thread_id))
    except NotFound as exc:
        msg = f"thread {thread_id} no longer exists at Nylas"
        raise _Ignored(msg) from exc
    upsert_thread_with_messages(conn, inbox_id, thread, messages, fetched_at=fetched_at)


def _fetch_message(client: NylasClient, grant_id: str, message_id: str) -> Message:
    try:
        return client.get_message(grant_id, message_id)
    except NotFound as exc:
        msg = f"message {message_id} no longer exists at Nylas"
        raise _Ignored(msg) from exc


def _sync_message(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, grant_id: str, job: WebhookJob
) -> None:
    # Taken before the reads: the version stamp must not be newer than the state it labels.
    fetched_at = datetime.now(UTC)
    message_id = _message_id(job)
    message = _fetch_message(client, grant_id, message_id)
    if not message.thread_id:
        msg = f"message {message_id} has no thread_id at Nylas"
        raise _Ignored(msg)
    _store_thread(conn, client, inbox_id, grant_id, message.thread_id, [message], fetched_at=fetched_at)


def _sync_replied_thread(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, grant_id: str, job: WebhookJob
) -> None:
    fetched_at = datetime.now(UTC)
    obj = _object(job.payload)
    thread_id = _first_string(obj.get("thread_id"))
    if thread_id is None:
        reply_id = _first_string(obj.get("message_id"))
        if reply_id is None:
            msg = "thread id missing from the payload (looked at data.object.thread_id and data.object.message_id)"
            raise _Ignored(msg)
        thread_id = _fetch_message(client, grant_id, reply_id).thread_id
        if not thread_id:
            msg = f"reply {reply_id} has no thread_id at Nylas"
            raise _Ignored(msg)
    _store_thread(conn, client, inbox_id, grant_id, thread_id, [], fetched_at=fetched_at)


def _expire_grant(conn: psycopg.Connection, job: WebhookJob) -> None:
    grant_id = _grant_of(job)
    if grant_id is None and job.inbox_id is None:
        msg = "no grant id in the job or the payload (looked at grant_id, data.object.grant_id)"
        raise _Ignored(msg)
    if mark_grant_expired(conn, inbox_id=job.inbox_id, grant_id=grant_id):
        return
    row = conn.execute(queries.GET_INBOX_BY_GRANT, {"grant_id": grant_id}).fetchone()
    if row is None and job.inbox_id is not None:
        row = conn.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    if row is None:
        msg = f"no inbox has grant {grant_id!r}; nothing to mark auth_expired"
        raise _Ignored(msg)
    log.info("Grant {} was already expired", grant_id)


def _base_type(kind: str) -> str:
    # message.created.cleaned.transformed.truncated -> message.created (docs/nylas-v3.md, c.2)
    return ".".join(kind.split(".")[:2])


def _apply(conn: psycopg.Connection, client: NylasClient, job: WebhookJob) -> None:
    base = _base_type(job.notification_type)
    if base == "grant.expired":
        _expire_grant(conn, job)
        return
    if base not in {"message.created", "message.updated", "thread.replied"}:
        msg = f"notification type {job.notification_type!r} is not handled"
        raise _Ignored(msg)
    inbox_id, grant_id, status = _resolve_inbox(conn, job)
    conn.execute(queries.TOUCH_INBOX_WEBHOOK, {"inbox_id": inbox_id})
    if status == "auth_expired":
        msg = "the inbox is auth_expired; re-authenticate it first"
        raise _Ignored(msg)
    try:
        if base == "thread.replied":
            _sync_replied_thread(conn, client, inbox_id, grant_id, job)
        else:
            _sync_message(conn, client, inbox_id, grant_id, job)
    except GrantExpired as exc:
        mark_grant_expired(conn, inbox_id=inbox_id, grant_id=grant_id)
        msg = "the grant has expired; the inbox is now auth_expired"
        raise _Ignored(msg) from exc


def _acknowledge(
    conn: psycopg.Connection,
    job: WebhookJob,
    status: str,
    *,
    error: str | None = None,
    duration_ms: int | None = None,
    attempts: int | None = None,
) -> bool:
    """Record `status` (and `attempts`, when given) on the job's audit row; False when there is no such row."""
    if job.notification_id is None:
        return False
    row = conn.execute(
        queries.ACKNOWLEDGE_WEBHOOK,
        {
            "notification_id": job.notification_id,
            "status": status,
            "error": error,
            "duration_ms": duration_ms,
            "attempts": attempts,
        },
    ).fetchone()
    return bool(row and row[0])


def _require_audit_row(conn: psycopg.Connection, job: WebhookJob, attempt: int | None) -> None:
    """Start the attempt on the audit row; a job without one could never show its outcome, so it is refused."""
    if job.notification_id is None:
        msg = (
            f"Webhook job {job.webhook_id!r} ({job.notification_type}) has no notification_id, so no audit row "
            "would record its outcome; enqueue webhooks with queue_nylas_webhook_notification, which writes both"
        )
        raise InvalidJob(msg)
    if not _acknowledge(conn, job, "processing", attempts=attempt):
        msg = (
            f"Webhook job names notification {job.notification_id}, which has no audit row in "
            "flux_webhook_notifications (or a rejected one); enqueue webhooks with queue_nylas_webhook_notification"
        )
        raise InvalidJob(msg)


def process_webhook(
    conn: psycopg.Connection, client: NylasClient, job: WebhookJob, *, attempt: int | None = None
) -> WebhookResult:
    """Apply one webhook event and record the attempt on its audit row.

    Parameters:
        attempt: which attempt this run is (1 for the first), recorded as the row's ``attempts``. Pass it from
            the job's retry count: a run deferred by a rate limit then leaves ``attempts`` as before. Without it,
            every run, deferred or not, counts one more.

    Raises:
        InvalidJob: the job has no audit row to record on (it did not come from
            ``queue_nylas_webhook_notification``); nothing is applied.
        RateLimited: too early, not failed: re-run the job after ``retry_after_ms`` without counting an attempt.
            The audit row stays ``processing`` with a note, its ``attempts`` back to ``attempt - 1``.
        ServerError, NylasConnectionError, psycopg.Error: transient; the attempt is recorded as ``error`` and the
            job should be retried.
    """
    started = time.monotonic()
    _require_audit_row(conn, job, attempt)
    try:
        _apply(conn, client, job)
    except _Ignored as exc:
        duration_ms = int((time.monotonic() - started) * 1000)
        _acknowledge(conn, job, "ignored", error=str(exc), duration_ms=duration_ms)
        log.info("Ignored {} {}: {}", job.notification_type, job.webhook_id, exc)
        return WebhookResult(outcome=WebhookOutcome.IGNORED, reason=str(exc), duration_ms=duration_ms)
    except RateLimited as exc:
        # Not an error and not an attempt: the run gives its number back (acknowledge's status list has no
        # "waiting" state to return to, so the row stays processing, with the note saying until when).
        note = f"deferred by a rate limit, not an attempt; runs again in {exc.retry_after_ms} ms: {exc}"
        given_back = None if attempt is None else attempt - 1
        _acknowledge(conn, job, "processing", error=note[:2000], attempts=given_back)
        log.info("Deferred {} {}: {}", job.notification_type, job.webhook_id, exc)
        raise
    except Exception as exc:
        record_webhook_error(conn, job, f"{type(exc).__name__}: {exc}", started=started)
        raise
    duration_ms = int((time.monotonic() - started) * 1000)
    _acknowledge(conn, job, "processed", duration_ms=duration_ms)
    return WebhookResult(outcome=WebhookOutcome.PROCESSED, duration_ms=duration_ms)


def record_webhook_error(
    conn: psycopg.Connection, job: WebhookJob, error: str, *, started: float | None = None
) -> None:
    """Record a failed attempt (status ``error`` with the text); the job may still be retried."""
    duration_ms = int((time.monotonic() - started) * 1000) if started is not None else None
    try:
        _acknowledge(conn, job, "error", error=error[:2000], duration_ms=duration_ms)
    except psycopg.Error as exc:  # the database itself may be what failed; the retry will record it
        log.warning("Could not record the error of webhook {}: {}", job.webhook_id, exc)
