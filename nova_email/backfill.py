"""Backfill: discover up to a year of an inbox's threads, page by page, then fan out thread jobs.

Each page is recorded together with its checkpoint (``record_backfill_page``), so a crash or a
retry resumes at the next unfetched page and never lists a saved page again. The hand-over to
thread sync and the fan-out of one job per thread are one transaction
(``finish_backfill_listing``): they cannot half-happen.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import attrs
import psycopg
from loguru import logger
from psycopg.types.json import Jsonb

from . import queries
from .errors import InvalidJob
from .jobs import BackfillJob
from .nylas.client import NylasClient
from .nylas.errors import GrantExpired
from .thread_sync import GRANT_EXPIRED_ERROR, mark_grant_expired

__all__ = ["BackfillResult", "record_backfill_failure", "run_backfill"]

log = logger.bind(component="Backfill")

#: Only what deduplication needs is asked of the thread list.
LIST_FIELDS = ("id", "latest_message_received_date")
#: Statuses in which a backfill job is stale: its run already handed over to thread sync.
_FINISHED = {"thread_sync", "completed"}


@attrs.frozen(kw_only=True)
class BackfillResult:
    """What one backfill run did."""

    config_id: str
    pages: int = 0
    threads_queued: int = 0
    threads_skipped: int = 0
    jobs_sent: int = 0
    resumed_from_page: int = 0
    outcome: str = "thread_sync"
    elapsed_ms: int = 0


def record_backfill_failure(conn: psycopg.Connection, job: BackfillJob, error: str) -> None:
    """Mark the run ``failed`` with the error; the checkpoint stays, so a retry or a new run resumes."""
    try:
        conn.execute(queries.RECORD_BACKFILL_FAILURE, {"config_id": job.config_id, "error": error[:2000]})
    except psycopg.errors.NoDataFound:
        # No configuration, no run to mark: the job's dead letter is the only record, and says why.
        log.warning("Backfill of config {} failed, but the configuration does not exist: {}", job.config_id, error)


def run_backfill(
    conn: psycopg.Connection, client: NylasClient, job: BackfillJob, *, page_size: int = 200
) -> BackfillResult:
    """List the inbox's threads in the job's window, record them, and start thread sync.

    Raises:
        InvalidJob: the job names a configuration that does not exist (never made, or deleted with its inbox).
        RateLimited, ServerError, NylasConnectionError: transient; the checkpoint is saved, retry the job.
    """
    started = time.monotonic()
    params = {"config_id": job.config_id}
    row = conn.execute(queries.GET_CONFIG, params).fetchone()
    if row is None:
        msg = (
            f"Backfill job names configuration {job.config_id}, which does not exist (never created, or deleted "
            "with its inbox); queue backfills with queue_inbox_backfill"
        )
        raise InvalidJob(msg)
    if row[0] in _FINISHED:
        log.info("Backfill job for config {} ignored: the run already reached {}", job.config_id, row[0])
        return BackfillResult(config_id=str(job.config_id), outcome="already_done")

    inbox = conn.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    grant_id = job.grant_id or (inbox[1] if inbox else "")
    if inbox is None or not grant_id or inbox[2] == "auth_expired":
        reason = GRANT_EXPIRED_ERROR if inbox is not None and inbox[2] == "auth_expired" else "the inbox has no grant"
        record_backfill_failure(conn, job, reason)
        log.warning("Backfill of config {} stopped: {}", job.config_id, reason)
        return BackfillResult(config_id=str(job.config_id), outcome="no_grant")

    progress: dict[str, Any] = conn.execute(queries.START_BACKFILL_RUN, params).fetchone()[0]  # type: ignore[index]
    conn.execute(queries.INITIALIZE_SYNC_STATS, params)
    page = int(progress.get("current_page") or 0)
    resumed_from = page
    queued = skipped = pages = 0
    try:
        if not progress.get("listing_complete"):
            if page:
                log.info("Resuming backfill of config {} after page {}", job.config_id, page)
            for listed in client.iter_threads(
                grant_id,
                latest_message_after=job.start_date,
                latest_message_before=job.end_date,
                page_token=progress.get("last_page_token"),
                limit=page_size,
                select=LIST_FIELDS,
            ):
                page += 1
                pages += 1
                threads = [
                    {"id": t.id, "latest_message_received_date": _unix(t.latest_message_received_date)}
                    for t in listed.threads
                ]
                page_queued, page_skipped, total = conn.execute(  # type: ignore[misc]
                    queries.RECORD_BACKFILL_PAGE,
                    {
                        "config_id": job.config_id,
                        "threads": Jsonb(threads),
                        "next_page_token": listed.next_cursor,
                        "page": page,
                    },
                ).fetchone()
                queued += page_queued
                skipped += page_skipped
                log.info(
                    "Config {} page {}: {} new threads, {} skipped, {} in total",
                    str(job.config_id)[:8],
                    page,
                    page_queued,
                    page_skipped,
                    total,
                )
    except GrantExpired:
        mark_grant_expired(conn, inbox_id=job.inbox_id, grant_id=grant_id)
        record_backfill_failure(conn, job, GRANT_EXPIRED_ERROR)
        return BackfillResult(config_id=str(job.config_id), pages=pages, outcome="grant_expired")

    sent = conn.execute(queries.FINISH_BACKFILL_LISTING, params).fetchone()[0]  # type: ignore[index]
    elapsed_ms = int((time.monotonic() - started) * 1000)
    log.info("Config {} listed {} pages in {} ms; {} thread jobs sent", str(job.config_id)[:8], pages, elapsed_ms, sent)
    return BackfillResult(
        config_id=str(job.config_id),
        pages=pages,
        threads_queued=queued,
        threads_skipped=skipped,
        jobs_sent=sent,
        resumed_from_page=resumed_from,
        elapsed_ms=elapsed_ms,
    )


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None
