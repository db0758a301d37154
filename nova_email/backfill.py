"""Backfill: discover up to a year of an inbox's threads, page by page, then fan out thread jobs.

The listing asks Nylas for every thread field the mirror stores, and each page is recorded together with its
checkpoint (``record_backfill_page``): threads whose stored copy is missing, partial or older than the listing are
queued with their listed copy, so their thread jobs fetch only the messages; current ones are left alone. A crash or
a retry resumes at the next unfetched page and never lists a saved page again.

A listing of any length completes: a run lists for at most ``SLICE_PAGES`` pages or ``SLICE_S`` seconds, then queues
the job that lists on from the checkpoint (``continue_backfill_listing``) and returns, so no run outlives its lease or
Dramatiq's time limit. The database refuses a page that does not follow the checkpoint, so a second run of the same
configuration (a duplicated or redelivered job) stops instead of listing alongside.

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
from psycopg.types.json import Jsonb

from . import queries
from .errors import InvalidJob
from .jobs import BackfillJob
from .nylas.client import THREAD_SELECT, NylasClient
from .nylas.errors import GrantExpired
from .sync import nylas_json
from .thread_sync import GRANT_EXPIRED_ERROR, mark_grant_expired

__all__ = ["RUN_TIME_LIMIT_MS", "SLICE_PAGES", "SLICE_S", "BackfillResult", "record_backfill_failure", "run_backfill"]

log = logger.bind(component="Backfill")

#: Every thread field the mirror stores: a listed thread is written from its listed copy when still current.
LIST_FIELDS = THREAD_SELECT
#: Most pages one run lists before it hands the rest of the listing to a new job (a slice).
SLICE_PAGES = 100
#: Most seconds one run lists before it hands over, well inside its time limit and the broker's lease.
SLICE_S = 240.0
#: Dramatiq's time limit of one run (the actor's ``time_limit``): a slice plus its last page, however slow (a page is
#: at most 4 attempts of NYLAS_TIMEOUT_S with backoff), fits well inside it. The listing as a whole has no limit.
RUN_TIME_LIMIT_MS = 15 * 60_000
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


def _superseded(error: psycopg.errors.ObjectNotInPrerequisiteState) -> bool:
    return "another run of this backfill is listing it" in str(error)


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
            listing = client.iter_threads(
                grant_id,
                latest_message_after=job.start_date,
                latest_message_before=job.end_date,
                page_token=progress.get("last_page_token"),
                limit=page_size,
                select=LIST_FIELDS,
            )
            while True:
                if pages and (pages >= slice_pages or time.monotonic() - started >= slice_s):
                    conn.execute(queries.CONTINUE_BACKFILL_LISTING, params)
                    log.info("Config {} listed {} pages in this run; a new job lists on", str(job.config_id)[:8], pages)
                    return _result(job, started, pages, queued, skipped, resumed_from, outcome="continued")
                # Taken before the read: the listed copies are versioned by it.
                listed_at = datetime.now(UTC)
                listed = next(listing, None)
                if listed is None:
                    break
                page += 1
                pages += 1
                page_queued, page_skipped, total = conn.execute(  # type: ignore[misc]
                    queries.RECORD_BACKFILL_PAGE,
                    {
                        "config_id": job.config_id,
                        "threads": Jsonb([nylas_json(t) for t in listed.threads]),
                        "next_page_token": listed.next_cursor,
                        "page": page,
                        "listed_at": listed_at,
                    },
                ).fetchone()
                queued += page_queued
                skipped += page_skipped
                log.info(
                    "Config {} page {}: {} threads to sync, {} current or skipped, {} in total",
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
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:
        if not _superseded(exc):
            raise
        log.info("Backfill job for config {} stopped: {}", job.config_id, exc.diag.message_primary)
        return BackfillResult(config_id=str(job.config_id), pages=pages - 1, outcome="superseded")

    sent = conn.execute(queries.FINISH_BACKFILL_LISTING, params).fetchone()[0]  # type: ignore[index]
    result = _result(job, started, pages, queued, skipped, resumed_from, outcome="thread_sync", sent=sent)
    log.info(
        "Config {} listed {} pages in {} ms; {} thread jobs sent",
        str(job.config_id)[:8],
        pages,
        result.elapsed_ms,
        sent,
    )
    return result


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
