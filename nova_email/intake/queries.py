"""Every statement the webhook intake runs, named. The work itself is done by the SQL functions of
``nova_email/sql/004_webhook_api.sql`` (see docs/sql-api.md), so each of these is one round trip.
"""

from __future__ import annotations

from typing import LiteralString

__all__ = ["QUEUE_WEBHOOK", "READINESS", "RECORD_REJECTED"]

#: Write the audit row and queue the webhook job in one transaction; deduplicates on webhook_id.
#: The payload is the body text as received, cast by Postgres, so nothing is re-serialised.
QUEUE_WEBHOOK: LiteralString = (
    "select notification_id, msg_id, duplicate "
    "from queue_nylas_webhook_notification(%(webhook_id)s, %(notification_type)s, null, %(payload)s::jsonb)"
)

#: Audit a signed body that could not be queued (status 'rejected', no queue message).
RECORD_REJECTED: LiteralString = "select record_rejected_webhook(%(raw_body)s, %(error)s) as notification_id"

#: Whether the two functions the intake calls exist (they come with `nova-email migrate`).
READINESS: LiteralString = (
    "select to_regprocedure('queue_nylas_webhook_notification(text, text, text, jsonb, uuid)') is not null"
    " as queue_function,"
    " to_regprocedure('record_rejected_webhook(text, text)') is not null as reject_function"
)
