"""Nova Email: a Postgres copy of Nylas mailboxes, kept in sync by Dramatiq actors over PGMQ.

From other Python code::

    import nova_email
    config_id, msg_id = nova_email.start_backfill(inbox_id)

    from nova_email.actors import sync_thread
    sync_thread.send({"thread_id": "...", "inbox_id": "...", "grant_id": "...", "config_id": None})
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["__version__", "start_backfill"]

__version__ = "0.1.0"


def start_backfill(
    inbox_id: uuid.UUID | str,
    *,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
    config_id: uuid.UUID | str | None = None,
    settings: Settings | None = None,
) -> tuple[uuid.UUID, int]:
    """Queue a backfill of an inbox through ``queue_inbox_backfill`` (the same SQL other services call).

    The window defaults to the last year and is capped at 365 days. Returns the configuration id and the PGMQ
    message id of the job.

    Raises:
        psycopg.errors.ObjectNotInPrerequisiteState: a backfill of this inbox is already active.
        psycopg.errors.NoDataFound: no such inbox (or configuration).
    """
    from . import db, queries
    from .config import load_settings

    settings = settings or load_settings()
    with db.connect(settings, autocommit=True) as conn:
        row = conn.execute(
            queries.QUEUE_INBOX_BACKFILL,
            {
                "inbox_id": str(inbox_id),
                "config_id": config_id and str(config_id),
                "start_date": start_date,
                "end_date": end_date,
            },
        ).fetchone()
    assert row is not None  # the function returns one row or raises
    return row[0], row[1]
