"""What the intake does with a body whose signature checked out: queue it once, or audit it as rejected.

Plain functions over a connection, so they can be driven against a real database without HTTP.
`receive` is the whole path; `parse_envelope`, `queue_webhook` and `record_rejected` are its steps.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import attrs
import psycopg
from psycopg.rows import dict_row

from . import queries
from .errors import InvalidWebhookBody

__all__ = [
    "MAX_FIELD_CHARS",
    "Envelope",
    "Receipt",
    "Rejection",
    "parse_envelope",
    "queue_webhook",
    "receive",
    "record_rejected",
]

#: Longest envelope `id` or `type` accepted. Nylas's are a few dozen characters; the cap keeps a hostile value
#: away from the unique index on webhook_id, whose entries must stay under ~2.7 kB.
MAX_FIELD_CHARS = 256


@attrs.frozen(kw_only=True)
class Envelope:
    """The parts of a Nylas CloudEvents envelope the intake needs; `text` is the body as received."""

    webhook_id: str
    notification_type: str
    text: str


@attrs.frozen(kw_only=True)
class Receipt:
    """A queued webhook: its audit row, its queue message, and whether an earlier delivery already queued it."""

    notification_id: UUID
    msg_id: int | None
    duplicate: bool


@attrs.frozen(kw_only=True)
class Rejection:
    """A signed body that was audited as rejected instead of queued."""

    notification_id: UUID
    reason: str
    #: The reason without anything quoted from the body, for the log (`InvalidWebhookBody.summary`).
    summary: str


def _refuse_constant(name: str) -> Any:
    msg = f"body is not JSON: {name} is not a JSON number; send finite numbers only"
    raise InvalidWebhookBody(msg)


def _text_field(envelope: dict[str, Any], key: str) -> str:
    value = envelope.get(key)
    if not isinstance(value, str) or not value.strip():
        expected = "expected a non-empty string (a Nylas CloudEvents envelope)"
        kind = "missing" if value is None else f"a JSON {type(value).__name__}"
        msg = f"envelope {key!r} is {value!r}; {expected}"
        raise InvalidWebhookBody(msg, summary=f"envelope {key!r} is {kind}; {expected}")
    if len(value) > MAX_FIELD_CHARS:
        msg = f"envelope {key!r} is {len(value)} characters long; expected at most {MAX_FIELD_CHARS}"
        raise InvalidWebhookBody(msg)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A "\ud800" escape decodes to a lone surrogate, which no database driver can send.
        msg = f"envelope {key!r} holds a lone UTF-16 surrogate at character {exc.start}; expected valid Unicode text"
        raise InvalidWebhookBody(msg) from exc
    return value


def parse_envelope(body: bytes) -> Envelope:
    """Read the envelope `id` and `type` from a webhook body.

    Raises:
        InvalidWebhookBody: the body is not UTF-8, not JSON, not an object, or has no usable `id` or `type`.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"body is not UTF-8 text ({exc.reason} at byte {exc.start}); send UTF-8 JSON"
        raise InvalidWebhookBody(msg) from exc
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        msg = f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise InvalidWebhookBody(msg) from exc
    except RecursionError as exc:
        msg = "body is not usable JSON: it is nested too deeply"
        raise InvalidWebhookBody(msg) from exc
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        msg = f"body is not usable JSON: {exc}"
        raise InvalidWebhookBody(msg) from exc
    if not isinstance(document, dict):
        msg = f"body is a JSON {type(document).__name__}; expected an object (a Nylas CloudEvents envelope)"
        raise InvalidWebhookBody(msg)
    return Envelope(
        webhook_id=_text_field(document, "id"),
        notification_type=_text_field(document, "type"),
        text=text,
    )


def queue_webhook(conn: psycopg.Connection[Any], envelope: Envelope) -> Receipt:
    """Write the audit row and queue the job, once per webhook id (a redelivery returns the first receipt).

    Raises:
        InvalidWebhookBody: Postgres refused the payload as jsonb (e.g. a ``\\u0000`` escape or a lone surrogate).
    """
    params = {
        "webhook_id": envelope.webhook_id,
        "notification_type": envelope.notification_type,
        "payload": envelope.text,
    }
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(queries.QUEUE_WEBHOOK, params).fetchone()
    except psycopg.DataError as exc:
        msg = f"payload refused by the database: {exc.diag.message_primary or exc}"
        summary = f"payload refused by the database ({type(exc).__name__}, SQLSTATE {exc.sqlstate})"
        raise InvalidWebhookBody(msg, summary=summary) from exc
    if row is None:  # the function always returns one row; this guards a broken migration
        msg = "queue_nylas_webhook_notification returned no row; run `nova-email migrate`"
        raise RuntimeError(msg)
    return Receipt(notification_id=row["notification_id"], msg_id=row["msg_id"], duplicate=row["duplicate"])


def _storable_text(body: bytes) -> str:
    # Postgres text cannot hold NUL, and a rejected body may be any bytes at all.
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def record_rejected(conn: psycopg.Connection[Any], body: bytes, reason: str) -> UUID:
    """Audit a body that will not be queued (status 'rejected', body cut to 1 MiB); returns the audit row id."""
    row = conn.execute(queries.RECORD_REJECTED, {"raw_body": _storable_text(body), "error": reason}).fetchone()
    if row is None:
        msg = "record_rejected_webhook returned no row; run `nova-email migrate`"
        raise RuntimeError(msg)
    notification_id: UUID = row[0]
    return notification_id


def receive(conn: psycopg.Connection[Any], body: bytes) -> Receipt | Rejection:
    """Queue a signed webhook body, or audit it as rejected when it is not a usable envelope.

    Call it only after the signature has been verified: an unsigned body must leave no trace.
    """
    try:
        return queue_webhook(conn, parse_envelope(body))
    except InvalidWebhookBody as exc:
        return Rejection(
            notification_id=record_rejected(conn, body, exc.reason), reason=exc.reason, summary=exc.summary
        )
