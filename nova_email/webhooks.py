"""Webhook processing: apply one Nylas webhook event to the mirror.

The webhook body is never trusted as data: it may be truncated, transformed, stale or mislabelled
(docs/nylas-v3.md, e). Only the ids are read from it; the objects are fetched from Nylas, so
duplicate and out-of-order deliveries converge on the current state. Routing is by base type,
so ``message.created.truncated`` and friends follow ``message.created``.

Every attempt is recorded on the audit row through ``acknowledge_webhook_notification``.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
from loguru import logger

from . import queries
from .jobs import WebhookJob
from .nylas.client import NylasClient
from .nylas.errors import GrantExpired, NotFound
from .sync import upsert_messages, upsert_thread, upsert_thread_with_messages
from .thread_sync import mark_grant_expired

__all__ = ["WebhookOutcome", "WebhookResult", "process_webhook", "record_webhook_error"]

log = logger.bind(component="Webhooks")


class WebhookOutcome(enum.StrEnum):
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
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return candidate
    return None


def _message_id(payload: Mapping[str, Any]) -> str:
    data = payload.get("data") if isinstance(payload.get("data"), Mapping) else {}
    obj = payload.get("object") if isinstance(payload.get("object"), Mapping) else {}
    found = _first_string(_object(payload).get("id"), data.get("id"), obj.get("id"), payload.get("id"))  # type: ignore[union-attr]
    if found is None:
        msg = "message id missing from the payload (looked at data.object.id, data.id, object.id, id)"
        raise _Ignored(msg)
    return found


def _resolve_inbox(conn: psycopg.Connection, job: WebhookJob) -> tuple[uuid.UUID, str, str]:
    grant_id = job.grant_id or _first_string(_object(job.payload).get("grant_id"))
    if job.inbox_id is not None:
        row = conn.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    elif grant_id:
        row = conn.execute(queries.GET_INBOX_BY_GRANT, {"grant_id": grant_id}).fetchone()
    else:
        msg = "no grant id in the job or the payload"
        raise _Ignored(msg)
    if row is None:
        msg = f"no inbox has grant {grant_id!r}"
        raise _Ignored(msg)
    return row[0], grant_id or row[1], row[2]


def _sync_message(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, grant_id: str, message_id: str
) -> None:
    fetched_at = datetime.now(UTC)
    try:
        message = client.get_message(grant_id, message_id)
    except NotFound as exc:
        msg = f"message {message_id} no longer exists at Nylas"
        raise _Ignored(msg) from exc
    if not message.thread_id:
        msg = f"message {message_id} has no thread_id at Nylas"
        raise _Ignored(msg)
    thread_row = conn.execute(queries.THREAD_ROW_ID, {"inbox_id": inbox_id, "thread_id": message.thread_id}).fetchone()
    thread = client.get_thread(grant_id, message.thread_id)
    if thread_row is None:
        # A message on a thread we do not hold pulls in the whole thread.
        messages = list(client.iter_thread_messages(grant_id, message.thread_id))
        upsert_thread_with_messages(conn, inbox_id, thread, messages, fetched_at=fetched_at)
        return
    with conn.transaction():
        thread_row_id = upsert_thread(conn, inbox_id, thread, fetched_at=fetched_at)
        upsert_messages(conn, inbox_id, thread_row_id, [message], fetched_at=fetched_at)


def _sync_thread_metadata(
    conn: psycopg.Connection, client: NylasClient, inbox_id: uuid.UUID, grant_id: str, payload: Mapping[str, Any]
) -> None:
    thread_id = _first_string(_object(payload).get("thread_id"))
    if thread_id is None:
        msg = "thread id missing from the payload (looked at data.object.thread_id)"
        raise _Ignored(msg)
    fetched_at = datetime.now(UTC)
    try:
        thread = client.get_thread(grant_id, thread_id)
    except NotFound as exc:
        msg = f"thread {thread_id} no longer exists at Nylas"
        raise _Ignored(msg) from exc
    upsert_thread(conn, inbox_id, thread, fetched_at=fetched_at)


def _apply(conn: psycopg.Connection, client: NylasClient, job: WebhookJob) -> None:
    kind = job.notification_type
    if kind.startswith("grant.expired"):
        grant_id = job.grant_id or _first_string(_object(job.payload).get("grant_id"))
        if not mark_grant_expired(conn, inbox_id=job.inbox_id, grant_id=grant_id):
            log.info("Grant {} was already expired or belongs to no inbox", grant_id)
        return
    if not (kind.startswith(("message.created", "message.updated", "thread.replied"))):
        msg = f"notification type {kind!r} is not handled"
        raise _Ignored(msg)
    inbox_id, grant_id, status = _resolve_inbox(conn, job)
    conn.execute(queries.TOUCH_INBOX_WEBHOOK, {"inbox_id": inbox_id})
    if status == "auth_expired":
        msg = "the inbox is auth_expired; re-authenticate it first"
        raise _Ignored(msg)
    try:
        if kind.startswith("thread.replied"):
            _sync_thread_metadata(conn, client, inbox_id, grant_id, job.payload)
        else:
            _sync_message(conn, client, inbox_id, grant_id, _message_id(job.payload))
    except GrantExpired as exc:
        mark_grant_expired(conn, inbox_id=inbox_id, grant_id=grant_id)
        msg = "the grant has expired; the inbox is now auth_expired"
        raise _Ignored(msg) from exc


def _acknowledge(
    conn: psycopg.Connection, job: WebhookJob, status: str, *, error: str | None = None, duration_ms: int | None = None
) -> None:
    if job.notification_id is None:
        return
    conn.execute(
        queries.ACKNOWLEDGE_WEBHOOK,
        {
            "notification_id": job.notification_id,
            "status": status,
            "error": error,
            "duration_ms": duration_ms,
            "attempts": None,
        },
    )


def process_webhook(conn: psycopg.Connection, client: NylasClient, job: WebhookJob) -> WebhookResult:
    """Apply one webhook event and record the attempt on its audit row.

    Raises:
        RateLimited, ServerError, NylasConnectionError, psycopg.Error: transient; the attempt is recorded as
            ``error`` and the job should be retried.
    """
    started = time.monotonic()
    _acknowledge(conn, job, "processing")
    try:
        _apply(conn, client, job)
    except _Ignored as exc:
        duration_ms = int((time.monotonic() - started) * 1000)
        _acknowledge(conn, job, "ignored", error=str(exc), duration_ms=duration_ms)
        log.info("Ignored {} {}: {}", job.notification_type, job.webhook_id, exc)
        return WebhookResult(outcome=WebhookOutcome.IGNORED, reason=str(exc), duration_ms=duration_ms)
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
