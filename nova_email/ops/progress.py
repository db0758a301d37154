"""Backfill progress as operators see it: counters from ``get_sync_progress``, a rate, an ETA and a bar.

The numbers come from ``inbox_sync_stats`` through ``get_sync_progress`` (the same source as the original's
frontend progress bars), and times from the database's clock, so a client with a skewed clock still
computes the right rate.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import attrs
import psycopg
from psycopg.rows import class_row

from . import queries
from .table import format_count, format_duration

__all__ = ["BackfillProgress", "fetch_progress", "render_progress_line"]

#: Statuses after which a backfill does not move any more.
FINISHED_STATUSES = frozenset({"completed", "failed"})

#: Width of the bar, in characters.
BAR_WIDTH = 30


@attrs.frozen(kw_only=True)
class BackfillProgress:
    """One configuration's backfill, as ``get_sync_progress`` reports it, observed at `observed_at`."""

    config_id: uuid.UUID
    inbox_id: uuid.UUID
    email: str | None
    backfill_status: str
    threads_total: int
    threads_queued: int
    threads_processing: int
    threads_completed: int
    threads_failed: int
    messages_synced: int
    percent_complete: Decimal
    backfill_started_at: datetime | None
    backfill_completed_at: datetime | None
    sync_started_at: datetime | None
    last_thread_at: datetime | None
    sync_completed_at: datetime | None
    backfill_requested_at: datetime | None
    last_error: str | None
    observed_at: datetime

    @property
    def threads_done(self) -> int:
        """Threads that reached a terminal state (completed or failed)."""
        return self.threads_completed + self.threads_failed

    @property
    def finished(self) -> bool:
        """Whether the backfill reached ``completed`` or ``failed``."""
        return self.backfill_status in FINISHED_STATUSES

    @property
    def elapsed_s(self) -> float | None:
        """Seconds since the run started (until it completed, if it did)."""
        start = self.sync_started_at or self.backfill_started_at
        if start is None:
            return None
        end = self.sync_completed_at or self.backfill_completed_at or self.observed_at
        return max(0.0, (end - start) / timedelta(seconds=1))

    @property
    def rate_per_s(self) -> float | None:
        """Threads finished per second since the run started, or None before the first one."""
        elapsed = self.elapsed_s
        if not elapsed or not self.threads_done:
            return None
        return self.threads_done / elapsed

    @property
    def eta_s(self) -> float | None:
        """Seconds until every known thread is finished at the current rate (0 when finished, None if unknown).

        Threads still being listed are not known yet, so while the status is ``backfill`` this is a lower bound.
        """
        if self.finished:
            return 0.0
        rate = self.rate_per_s
        if rate is None:
            return None
        return (self.threads_total - self.threads_done) / rate

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the counters, the derived rate and ETA, times in ISO 8601."""
        data: dict[str, Any] = {}
        for field in attrs.fields(BackfillProgress):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, uuid.UUID):
                value = str(value)
            elif isinstance(value, Decimal):
                value = float(value)
            data[field.name] = value
        data["rate_threads_per_s"] = self.rate_per_s
        data["eta_s"] = self.eta_s
        return data


def fetch_progress(
    conn: psycopg.Connection, config_ids: Sequence[uuid.UUID | str] | None = None
) -> list[BackfillProgress]:
    """Progress of the given configurations, or of every active backfill when `config_ids` is None."""
    params = {
        "config_ids": None if config_ids is None else [str(c) for c in config_ids],
        "statuses": list(queries.ACTIVE_BACKFILL_STATUSES),
    }
    with conn.cursor(row_factory=class_row(BackfillProgress)) as cur:
        return cur.execute(queries.BACKFILL_PROGRESS, params).fetchall()


def render_progress_line(progress: BackfillProgress, *, width: int = BAR_WIDTH) -> str:
    """One line: bar, percent, threads done/total, in-flight counts, messages, rate, ETA and status."""
    fraction = min(1.0, float(progress.percent_complete) / 100)
    filled = round(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    rate = progress.rate_per_s
    parts = [
        f"[{bar}] {float(progress.percent_complete):5.1f}%",
        f"threads {format_count(progress.threads_done)}/{format_count(progress.threads_total)}"
        f" (queued {format_count(progress.threads_queued)}, processing {format_count(progress.threads_processing)},"
        f" failed {format_count(progress.threads_failed)})",
        f"messages {format_count(progress.messages_synced)}",
        f"rate {rate:.1f}/s" if rate is not None else "rate -",
        f"ETA {format_duration(progress.eta_s)}",
        progress.backfill_status,
    ]
    return "  ".join(parts)
