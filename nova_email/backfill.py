"""Backfill: discover up to a year of an inbox's threads, page by page, then fan out thread jobs.

The listing asks Nylas for every thread field the mirror stores, and each page is recorded together with its
checkpoint (``record_backfill_page``): threads whose stored copy is missing, partial or older than the listing are
queued with their listed copy, so their thread jobs fetch only the messages; current ones are left alone. A crash or
a retry resumes at the next unfetched page and never lists a saved page again.

A listing of any length completes: a run lists for at most ``SLICE_PAGES`` pages or ``SLICE_S`` seconds, then queues
the job that lists on from the checkpoint (``continue_backfill_listing``) and returns, so no run outlives its lease or
Dramatiq's time limit; the slices of a run keep its start times (``start_backfill_slice``). The database refuses a
page or a continuation that does not follow the checkpoint, and any slice of a run that already handed over, so a
second run of the same configuration (a duplicated or redelivered job) stops instead of listing alongside.

The hand-over to thread sync and the fan-out of one job per thread are one transaction
(``finish_backfill_listing``): they cannot half-happen.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
from loguru import logger
from psycopg.rows import class_row, scalar_row
from psycopg.types.json import Jsonb

from . import queries
from .errors import InvalidJob
from .jobs import BackfillJob
from .nylas.client import (
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_AFTER_MAX_S,
    THREAD_SELECT,
    NylasClient,
)
from .nylas.errors import GrantExpired
from .nylas.models import ThreadPage
from .sync import nylas_json
from .thread_sync import GRANT_EXPIRED_ERROR, mark_grant_expired

__all__ = [
    "RUN_FINISHED",
    "SLICE_PAGES",
    "SLICE_S",
    "SUPERSEDED",
    "BackfillResult",
    "record_backfill_failure",
    "run_backfill",
    "run_time_limit_ms",
]

log = logger.bind(component="Backfill")

#: Most pages one run lists before it hands the rest of the listing to a new job (a slice).
SLICE_PAGES = 100
#: Most seconds one run lists before it hands over, well inside its time limit and the broker's lease.
SLICE_S = 240.0
#: SQLSTATE of a slice refused because its run already handed over to thread sync: the job is stale.
RUN_FINISHED = "NB001"
#: SQLSTATE of a page or continuation refused because another run of the backfill is listing it.
SUPERSEDED = "NB002"


def run_time_limit_ms(nylas_timeout_s: float) -> int:
    """Dramatiq's time limit of one run (the backfill actor's ``time_limit``), for a Nylas timeout of `nylas_timeout_s`.

    A slice plus its slowest last page fits inside it with half again to spare: a page is at most every attempt of
    the client timing out on connect and on read, the backoff between attempts and one capped ``Retry-After``. The
    listing as a whole has no limit.
    """
    attempts = DEFAULT_MAX_RETRIES + 1
    slowest_page_s = (
        attempts * 2 * nylas_timeout_s + DEFAULT_MAX_RETRIES * DEFAULT_BACKOFF_MAX_S + DEFAULT_RETRY_AFTER_MAX_S
    )
    return int((SLICE_S + slowest_page_s) * 1.5 * 1000)


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
    conn: psycopg.Connection,
    client: NylasClient,
    job: BackfillJob,
    *,
    page_size: int = 200,
    slice_pages: int = SLICE_PAGES,
    slice_s: float = SLICE_S,
) -> BackfillResult:
    """List the inbox's threads in the job's window, record them, and start thread sync.

    After `slice_pages` pages or `slice_s` seconds the run queues the job that lists on and returns ``continued``.

    Raises:
        InvalidJob: the job names a configuration that does not exist (never made, or deleted with its inbox).
        RateLimited, ServerError, NylasConnectionError: transient; the checkpoint is saved, retry the job.
    """
    started = time.monotonic()
    params = {"config_id": job.config_id}
    try:
        with conn.cursor(row_factory=scalar_row) as cur:
            progress: dict[str, Any] = cur.execute(queries.START_BACKFILL_SLICE, params).fetchone() or {}
    except psycopg.errors.NoDataFound:
        msg = (
            f"Backfill job names configuration {job.config_id}, which does not exist (never created, or deleted "
            "with its inbox); queue backfills with queue_inbox_backfill"
        )
        raise InvalidJob(msg) from None
    except psycopg.DatabaseError as exc:
        if exc.sqlstate != RUN_FINISHED:
            raise
        log.info("Backfill job for config {} ignored: {}", job.config_id, exc.diag.message_primary)
        return BackfillResult(config_id=str(job.config_id), outcome="already_done")

    with conn.cursor(row_factory=class_row(queries.Inbox)) as cur:
        inbox = cur.execute(queries.GET_INBOX, {"inbox_id": job.inbox_id}).fetchone()
    grant_id = job.grant_id or (inbox.nylas_grant_id if inbox else None) or ""
    if inbox is None or not grant_id or inbox.status == "auth_expired":
        reason = (
            GRANT_EXPIRED_ERROR if inbox is not None and inbox.status == "auth_expired" else "the inbox has no grant"
        )
        record_backfill_failure(conn, job, reason)
        log.warning("Backfill of config {} stopped: {}", job.config_id, reason)
        return BackfillResult(config_id=str(job.config_id), outcome="no_grant")

    page = int(progress.get("current_page") or 0)
    resumed_from = page
    queued = skipped = pages = 0
    try:
        if not progress.get("listing_complete"):
            if page:
                log.info("Resuming backfill of config {} after page {}", job.config_id, page)
            listing = client.iter_threads(
                grant_id,
                latest_message_after=job.start_date,
                latest_message_before=job.end_date,
                page_token=progress.get("last_page_token"),
                limit=page_size,
                select=THREAD_SELECT,
            )
            while True:
                if pages and (pages >= slice_pages or time.monotonic() - started >= slice_s):
                    conn.execute(queries.CONTINUE_BACKFILL_LISTING, {**params, "page": page})
                    log.info("Config {} listed {} pages in this run; a new job lists on", str(job.config_id)[:8], pages)
                    return _result(job, started, pages, queued, skipped, resumed_from, outcome="continued")
                # Taken before the read: the listed copies are versioned by it.
                listed_at = datetime.now(UTC)
                listed = next(listing, None)
                if listed is None:
                    break
                recorded = _record_page(conn, job, listed, page=page + 1, listed_at=listed_at)
                # Counted once recorded: a page the database refused is not this run's.
                page += 1
                pages += 1
                queued += recorded.queued
                skipped += recorded.skipped
                log.info(
                    "Config {} page {}: {} threads to sync, {} current or skipped, {} in total",
                    str(job.config_id)[:8],
                    page,
                    recorded.queued,
                    recorded.skipped,
                    recorded.threads_queued,
                )
    except GrantExpired:
        mark_grant_expired(conn, inbox_id=job.inbox_id, grant_id=grant_id)
        record_backfill_failure(conn, job, GRANT_EXPIRED_ERROR)
        return BackfillResult(config_id=str(job.config_id), pages=pages, outcome="grant_expired")
    except psycopg.DatabaseError as exc:
        if exc.sqlstate != SUPERSEDED:
            raise
        log.info("Backfill job for config {} stopped: {}", job.config_id, exc.diag.message_primary)
        return BackfillResult(config_id=str(job.config_id), pages=pages, outcome="superseded")

    with conn.cursor(row_factory=scalar_row) as cur:
        sent = int(cur.execute(queries.FINISH_BACKFILL_LISTING, params).fetchone() or 0)
    result = _result(job, started, pages, queued, skipped, resumed_from, outcome="thread_sync", sent=sent)
    log.info(
        "Config {} listed {} pages in {} ms; {} thread jobs sent",
        str(job.config_id)[:8],
        pages,
        result.elapsed_ms,
        sent,
    )
    return result


def _record_page(
    conn: psycopg.Connection, job: BackfillJob, listed: ThreadPage, *, page: int, listed_at: datetime
) -> queries.PageRecorded:
    with conn.cursor(row_factory=class_row(queries.PageRecorded)) as cur:
        recorded = cur.execute(
            queries.RECORD_BACKFILL_PAGE,
            {
                "config_id": job.config_id,
                "threads": Jsonb([nylas_json(t) for t in listed.threads]),
                "next_page_token": listed.next_cursor,
                "page": page,
                "listed_at": listed_at,
            },
        ).fetchone()
    assert recorded is not None  # a set-returning function of one row
    return recorded


def _result(
    job: BackfillJob,
    started: float,
    pages: int,
    queued: int,
    skipped: int,
    resumed_from: int,
    *,
    outcome: str,
    sent: int = 0,
) -> BackfillResult:
    return BackfillResult(
        config_id=str(job.config_id),
        pages=pages,
        threads_queued=queued,
        threads_skipped=skipped,
        jobs_sent=sent,
        resumed_from_page=resumed_from,
        outcome=outcome,
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )
