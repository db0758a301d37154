"""Every SQL statement the simulator runs, named."""

from __future__ import annotations

from typing import LiteralString

__all__ = ["QUEUE_WEBHOOK"]

#: Hand one webhook to the service's intake: audit row + job on nylas_webhook_notifications (dedups on the id).
QUEUE_WEBHOOK: LiteralString = (
    "select * from queue_nylas_webhook_notification("
    "%(webhook_id)s, %(notification_type)s, %(grant_id)s, %(payload)s::jsonb)"
)
