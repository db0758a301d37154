"""Completion monitor: progress of active backfills, completion detection, and auto-recovery.

`check_backfills` runs on every COMPLETION_CHECK_INTERVAL_MS tick. The counters in
``inbox_sync_stats`` are kept by triggers; the monitor cross-checks them against a direct count
(and recomputes them if they ever drift), so completion is decided on two independent readings,
and `complete_backfill_if_done` decides it a last time under the configuration's row lock.

`recover_premature_completions` runs every RECOVERY_CHECK_INTERVAL_MS when ENABLE_AUTO_RECOVERY:
a configuration marked completed while threads are still pending goes back to thread sync.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import attrs
import psycopg
from loguru import logger

from . import queries

__all__ = ["BackfillProgress", "check_backfills", "recover_premature_completions"]

log = logger.bind(component="Monitor")


@attrs.frozen(kw_only=True)
class BackfillProgress:
    """One active backfill as the monitor saw it on a tick."""

    config_id: uuid.UUID
    status: str
    total: int
    queued: int
    processing: int
    completed: int
    failed: int
    messages_synced: int
    percent: Decimal
    just_completed: bool = False

    def line(self) -> str:
        """The original service's progress line."""
        done = self.completed + self.failed
        return (
            f"Config {str(self.config_id)[:8]}... | Status: {self.status} | "
            f"Progress: {round(self.percent)}% ({done}/{self.total})"
        )


def check_backfills(conn: psycopg.Connection) -> list[BackfillProgress]:
    """Log the progress of every active backfill and complete those whose threads are all terminal."""
    seen: list[BackfillProgress] = []
    for row in conn.execute(queries.ACTIVE_PROGRESS).fetchall():
        config_id, status, *counters = row[:8]
        direct = tuple(int(v) for v in row[10:16])
        trigger_counts = tuple(int(v) for v in counters)
        if trigger_counts != direct:
            # Triggers keep the counters exact; if they ever disagree, the direct count wins.
            log.warning("Config {} counters drifted {} != {}; recomputing", str(config_id)[:8], trigger_counts, direct)
            conn.execute(queries.INITIALIZE_SYNC_STATS, {"config_id": config_id})
        total, queued, processing, completed, failed, messages = direct
        just_completed = False
        if status in {"thread_sync", "in_progress"} and total > 0 and queued == 0 and processing == 0:
            completed_row = conn.execute(queries.COMPLETE_BACKFILL_IF_DONE, {"config_id": config_id}).fetchone()
            just_completed = bool(completed_row and completed_row[0])
        progress = BackfillProgress(
            config_id=config_id,
            status="completed" if just_completed else status,
            total=total,
            queued=queued,
            processing=processing,
            completed=completed,
            failed=failed,
            messages_synced=messages,
            percent=Decimal(100 * (completed + failed) / total) if total else Decimal(0),
            just_completed=just_completed,
        )
        log.info(progress.line())
        if just_completed:
            log.success("Config {}... completed: {} threads, {} messages", str(config_id)[:8], completed, messages)
        seen.append(progress)
    return seen


def recover_premature_completions(conn: psycopg.Connection) -> list[uuid.UUID]:
    """Re-open completed backfills that still have queued or processing threads; returns their ids."""
    reopened: list[uuid.UUID] = []
    for config_id, pending in conn.execute(queries.REOPEN_PREMATURE_COMPLETIONS).fetchall():
        sent = conn.execute(queries.QUEUE_UNSENT_THREAD_SYNCS, {"config_id": config_id}).fetchone()
        log.warning(
            "Config {}... was marked completed with {} threads pending; back to thread_sync ({} jobs re-sent)",
            str(config_id)[:8],
            pending,
            sent[0] if sent else 0,
        )
        reopened.append(config_id)
    return reopened
