"""The service's processors: each ``nova-email run`` name and the queues its workers consume.

Shared by the CLI (which starts them) and the health check (which expects their queues to exist).
"""

from __future__ import annotations

__all__ = ["PROCESSORS"]

#: ``nova-email run`` names -> the queues their workers consume; ``all`` consumes every queue.
PROCESSORS = {
    "webhooks": ["nylas_webhook_notifications"],
    "backfill": ["inbox_backfill_jobs"],
    "threads": ["thread_sync_jobs"],
    "completion": ["completion_monitor"],
}
PROCESSORS["all"] = [queue for queues in PROCESSORS.values() for queue in queues]
