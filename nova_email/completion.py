"""Completion monitor: progress of active backfills, completion detection, and auto-recovery.

`check_backfills` runs on every COMPLETION_CHECK_INTERVAL_MS tick. The counters in
``inbox_sync_stats`` are kept by triggers; the monitor cross-checks them against a direct count of
``queued_threads``. A backfill is completed only when both readings agree that every thread is
terminal, and `complete_backfill_if_done` then decides it a last time under the configuration's row
lock. Counters that drifted are recomputed, and completion waits for the next tick. A backfill
still listing pages (``backfill``) is never completed.

`recover_premature_completions` runs every RECOVERY_CHECK_INTERVAL_MS when ENABLE_AUTO_RECOVERY:
a configuration marked completed while threads are still pending goes back to thread sync.
"""

from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal

import attrs
import psycopg
from loguru import logger

from . import queries

__all__ = ["BackfillProgress", "check_backfills", "fail_dead_lettered_jobs", "recover_premature_completions"]

log = logger.bind(component="Monitor")

#: Statuses in which a backfill may be completed (``backfill`` is still listing, so more threads may come).
_COMPLETABLE = frozenset({"thread_sync", "in_progress"})


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
    #: Finished threads (completed or failed) in percent of all, to two decimals, as ``get_sync_progress`` gives it.
    percent: Decimal
    just_completed: bool = False

    def line(self) -> str:
        """The original service's progress line.

        For example ``Config 12345678... | Status: thread_sync | Progress: 75% (150/200)``.
        """
        done = self.completed + self.failed
        # The original printed Math.round(): half up (12.5 -> 13), where Python's round() would give 12.
        shown = (200 * done + self.total) // (2 * self.total) if self.total else 0
        return f"Config {str(self.config_id)[:8]}... | Status: {self.status} | Progress: {shown}% ({done}/{self.total})"


def _percent(done: int, total: int) -> Decimal:
    if not total:
        return Decimal(0)
    return (Decimal(100 * done) / total).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _recompute_counters(conn: psycopg.Connection, config_id: uuid.UUID) -> None:
    with conn.transaction():
        conn.execute(queries.LOCK_SYNC_STATS, {"config_id": config_id})
        conn.execute(queries.RECOMPUTE_SYNC_STATS, {"config_id": config_id})


def _complete(conn: psycopg.Connection, config_id: uuid.UUID) -> bool:
    try:
        row = conn.execute(queries.COMPLETE_BACKFILL_IF_DONE, {"config_id": config_id}).fetchone()
    except psycopg.errors.NoDataFound:
        # Deleted since this tick listed it; the other backfills still get their check.
        log.info("Config {}... was deleted during the check", str(config_id)[:8])
        return False
    return bool(row and row[0])


def check_backfills(conn: psycopg.Connection) -> list[BackfillProgress]:
    """Log the progress of every active backfill and complete those whose threads are all terminal.

    Call it periodically (the ``check_completion`` actor does). Returns what it saw, one entry per active backfill.
    """
    seen: list[BackfillProgress] = []
    fail_dead_lettered_jobs(conn)
    for row in conn.execute(queries.ACTIVE_PROGRESS).fetchall():
        config_id, status, *counters = row[:8]
        direct = tuple(int(v) for v in row[10:16])
        agree = tuple(int(v) for v in counters) == direct
        if not agree:
            log.warning(
                "Config {}... counters drifted {} != direct count {}; recomputed",
                str(config_id)[:8],
                tuple(counters),
                direct,
            )
            _recompute_counters(conn, config_id)
        total, queued, processing, completed, failed, messages = direct
        all_terminal = total > 0 and queued == 0 and processing == 0
        just_completed = agree and all_terminal and status in _COMPLETABLE and _complete(conn, config_id)
        progress = BackfillProgress(
            config_id=config_id,
            status="completed" if just_completed else status,
            total=total,
            queued=queued,
            processing=processing,
            completed=completed,
            failed=failed,
            messages_synced=messages,
            percent=_percent(completed + failed, total),
            just_completed=just_completed,
        )
        log.info(progress.line())
        if just_completed:
            log.success("Config {}... completed: {} threads, {} messages", str(config_id)[:8], completed, messages)
        seen.append(progress)
    return seen


def fail_dead_lettered_jobs(conn: psycopg.Connection) -> int:
    """Give a terminal state to threads, webhooks and backfills whose job the broker dead-lettered behind the actors'
    backs.

    The actors record every failure they see, but a poison message (its worker died ``max_deliveries`` times) or
    an undecodable body is dead-lettered by the broker before any actor runs. Without this, such a thread would
    stay ``processing`` and its backfill would never complete, and such a backfill would stay active and refuse
    every new one. Returns how many rows were failed.
    """
    threads = conn.execute(queries.FAIL_DEAD_LETTERED_THREADS).fetchall()
    webhooks = conn.execute(queries.FAIL_DEAD_LETTERED_WEBHOOKS).fetchall()
    backfills = conn.execute(queries.FAIL_DEAD_LETTERED_BACKFILLS).fetchall()
    for config_id, thread_id, reason in threads:
        log.warning(
            "Config {}... thread {} failed: its job was dead-lettered ({})", str(config_id)[:8], thread_id, reason
        )
    for notification_id, reason in webhooks:
        log.warning("Webhook {} failed: its job was dead-lettered ({})", notification_id, reason)
    for config_id, reason, _ in backfills:
        log.warning("Config {}... backfill failed: its job was dead-lettered ({})", str(config_id)[:8], reason)
    return len(threads) + len(webhooks) + len(backfills)


def recover_premature_completions(conn: psycopg.Connection) -> list[uuid.UUID]:
    """Re-open completed backfills that still have queued or processing threads; returns their ids.

    Each goes back to ``thread_sync`` with its completion timestamps cleared, and every thread of it that was
    never put on the queue is sent, in the same transaction, so a crash cannot leave it re-opened but unsent.
    """
    reopened: list[tuple[uuid.UUID, int, int]] = []
    with conn.transaction():
        for config_id, pending in conn.execute(queries.REOPEN_PREMATURE_COMPLETIONS).fetchall():
            sent = 0
            # The SQL function sends at most a batch per call; loop until nothing is left unsent.
            while batch := _scalar(conn.execute(queries.QUEUE_UNSENT_THREAD_SYNCS, {"config_id": config_id})):
                sent += batch
            reopened.append((config_id, int(pending), sent))
    for config_id, pending, sent in reopened:
        log.warning(
            "Config {}... was marked completed with {} threads pending; back to thread_sync ({} jobs re-sent)",
            str(config_id)[:8],
            pending,
            sent,
        )
    return [config_id for config_id, _, _ in reopened]


def _scalar(cursor: psycopg.Cursor[tuple[int]]) -> int:
    row = cursor.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0
