"""The service's Dramatiq actors, one set per queue. Importing this module sets up the PGMQ broker and nothing
else: it reads no setting and reaches no database. The first send reads the settings and the database URL;
logging, the settings of the broker and the actors (`configure_worker`) and the checks a worker needs happen when
Dramatiq boots a worker process (`nova_email.boot`).

Run one processor with ``dramatiq nova_email.actors --queues thread_sync_jobs`` (or
``nylas_webhook_notifications``, ``inbox_backfill_jobs``, ``completion_monitor``), all of them with
``make run-all``. Enqueue from Python with ``sync_thread.send({...})``; SQL producers put plain JSON
objects on the queues, which the broker hands to each queue's ``queue_handler`` actor.

Each actor only decodes its payload, opens a connection, calls one processor function and
translates errors: a bad payload is dead-lettered at once (``throws``), a Nylas 429 is
re-scheduled after its Retry-After without using an attempt, and when the last attempt fails the
``on_give_up`` hook leaves the domain row in a terminal state. Attempts are spread so that the last one comes at
least the processor's retry window (WEBHOOK_/BACKFILL_/THREAD_RETRY_WINDOW_MS, 2 minutes) after the first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage

from brokers import PeriodicScheduler, RetryAfter

from . import backfill, completion, db, thread_sync, webhooks
from .boot import WorkerBoot
from .config import Settings, current_settings
from .errors import InvalidJob
from .jobs import BackfillJob, ThreadSyncJob, WebhookJob, structure_job
from .nylas.errors import RateLimited
from .worker import build_broker, configure_broker, nylas_client

__all__ = [
    "BACKFILL_QUEUE",
    "COMPLETION_QUEUE",
    "QUEUES",
    "THREAD_QUEUE",
    "WEBHOOK_QUEUE",
    "broker",
    "check_completion",
    "configure_worker",
    "process_webhook",
    "recover_completions",
    "retry_backoff_ms",
    "run_backfill",
    "sync_thread",
]

WEBHOOK_QUEUE = "nylas_webhook_notifications"
BACKFILL_QUEUE = "inbox_backfill_jobs"
THREAD_QUEUE = "thread_sync_jobs"
COMPLETION_QUEUE = "completion_monitor"
#: Processor name (as in ``nova-email run``) -> its queue.
QUEUES = {
    "webhooks": WEBHOOK_QUEUE,
    "backfill": BACKFILL_QUEUE,
    "threads": THREAD_QUEUE,
    "completion": COMPLETION_QUEUE,
}

J = TypeVar("J")

#: The options the actors are declared with come from the settings' defaults (reading nothing); a worker process
#: replaces them with its settings when it boots (`configure_worker`).
_DEFAULTS = Settings()

broker = build_broker()
dramatiq.set_broker(broker)


def retry_backoff_ms(window_ms: int, attempts: int) -> int:
    """The ``min_backoff`` that puts the last of `attempts` (2 or more) at least `window_ms` after the first.

    Dramatiq waits ``min_backoff * 2**k`` (times a jitter of 1 to 2) before retry k + 1, so the attempts span at
    least ``min_backoff * (2**(attempts - 1) - 1)``.
    """
    return max(1, math.ceil(window_ms / ((1 << (attempts - 1)) - 1)))


def _give_up(
    cls: type[J], record: Callable[[psycopg.Connection, J, str], object]
) -> Callable[[Any, BaseException], None]:
    """An ``on_give_up`` hook: after the last attempt, `record` the error on the job's domain row."""

    def hook(message: Any, exc: BaseException) -> None:
        try:
            job = structure_job(message.args[0] if message.args else None, cls)
        except InvalidJob:
            return  # an undecodable payload has no domain row; its dead letter says why
        if isinstance(exc, InvalidJob):
            error = f"invalid job, not retried: {exc}"  # `throws`: the one attempt was not counted as a retry
        else:
            error = f"gave up after {int(message.options.get('retries', 0))} attempt(s): {type(exc).__name__}: {exc}"
        with db.connection(current_settings()) as conn:
            record(conn, job, error)

    return hook


def _grant_of(payload: object) -> object:
    """A job's fairness key: its grant, so jobs are dispatched fairly across grants (a payload without one is
    unkeyed, and the actor rejects it)."""
    return payload.get("grant_id") if isinstance(payload, dict) else None


def _attempt() -> int | None:
    """This run's attempt number (1 for the first); a rate-limit deferral does not advance it."""
    message = CurrentMessage.get_current_message()
    return None if message is None else int(message.options.get("retries", 0)) + 1


@contextmanager
def _deferred_on_rate_limit() -> Iterator[None]:
    """A Nylas 429 (or the shared pacing being full) re-runs the job after Retry-After, without using an attempt."""
    try:
        yield
    except RateLimited as exc:
        raise RetryAfter(str(exc), retry_after_ms=exc.retry_after_ms) from exc


# -- webhooks (3 attempts) -------------------------------------------------------------------------------------------


@dramatiq.actor(
    queue_name=WEBHOOK_QUEUE,
    queue_handler=True,
    fairness_key=_grant_of,
    max_retries=2,
    min_backoff=retry_backoff_ms(_DEFAULTS.webhook_retry_window_ms, 3),
    throws=(InvalidJob,),
    on_give_up=_give_up(WebhookJob, webhooks.record_webhook_error),
)
def process_webhook(payload: dict[str, Any]) -> None:
    """Apply one Nylas webhook event (message.created/updated, thread.replied, grant.expired)."""
    job = structure_job(payload, WebhookJob)
    settings = current_settings()
    with db.connection(settings) as conn, _deferred_on_rate_limit():
        webhooks.process_webhook(conn, nylas_client(settings), job, attempt=_attempt())


# -- backfill (3 attempts, checkpoint kept) --------------------------------------------------------------------------


@dramatiq.actor(
    queue_name=BACKFILL_QUEUE,
    queue_handler=True,
    fairness_key=_grant_of,
    max_retries=2,
    min_backoff=retry_backoff_ms(_DEFAULTS.backfill_retry_window_ms, 3),
    time_limit=backfill.run_time_limit_ms(_DEFAULTS.nylas_timeout_s),
    throws=(InvalidJob,),
    on_give_up=_give_up(BackfillJob, backfill.record_backfill_failure),
)
def run_backfill(payload: dict[str, Any]) -> None:
    """Discover an inbox's threads (up to a year), then fan out one thread job each."""
    job = structure_job(payload, BackfillJob)
    settings = current_settings()
    with db.connection(settings) as conn, _deferred_on_rate_limit():
        backfill.run_backfill(conn, nylas_client(settings), job)


# -- thread sync (5 attempts) ----------------------------------------------------------------------------------------


@dramatiq.actor(
    queue_name=THREAD_QUEUE,
    queue_handler=True,
    fairness_key=_grant_of,
    # Among the jobs a worker process holds, webhooks and backfills (priority 0) go first: a listing fans out a
    # whole inbox's thread jobs, and a webhook is a live change.
    priority=10,
    max_retries=4,
    min_backoff=retry_backoff_ms(_DEFAULTS.thread_retry_window_ms, 5),
    throws=(InvalidJob,),
    on_give_up=_give_up(ThreadSyncJob, thread_sync.record_thread_failure),
)
def sync_thread(payload: dict[str, Any]) -> None:
    """Fetch one thread and all its messages and upsert them."""
    job = structure_job(payload, ThreadSyncJob)
    settings = current_settings()
    with db.connection(settings) as conn, _deferred_on_rate_limit():
        try:
            result = thread_sync.sync_thread(conn, nylas_client(settings), job)
        except RateLimited:
            thread_sync.release_thread(conn, job)
            raise
    pause_ms = settings.thread_delay_ms + settings.message_delay_ms * result.messages
    if pause_ms:
        time.sleep(pause_ms / 1000)  # the original's fixed delays, only when explicitly configured


# -- completion monitor (periodic) -----------------------------------------------------------------------------------


@dramatiq.actor(queue_name=COMPLETION_QUEUE, max_retries=0)
def check_completion() -> None:
    """Progress of every active backfill; completes those whose threads are all done."""
    with db.connection(current_settings()) as conn:
        completion.check_backfills(conn)


@dramatiq.actor(actor_name="recover_completions", queue_name=COMPLETION_QUEUE, max_retries=0)
def recover_completions() -> None:
    """Re-open backfills marked completed while threads are still pending (when ENABLE_AUTO_RECOVERY)."""
    with db.connection(current_settings()) as conn:
        completion.recover_premature_completions(conn)


def configure_worker(settings: Settings) -> None:
    """What a booting worker process takes from its settings: the broker's, then each actor's retry spacing, time
    limit and schedule (without ENABLE_AUTO_RECOVERY, ``recover_completions`` exists, to be sent by hand, unscheduled).

    Raises:
        ConfigError: no database to use (DATABASE_URL unset in an installed package).
        DatabaseError: the embedded server could not be started.
    """
    db.database_url(settings)  # where the database is, decided (the embedded server started) before consuming
    configure_broker(broker, settings)
    process_webhook.options["min_backoff"] = retry_backoff_ms(settings.webhook_retry_window_ms, 3)
    run_backfill.options["min_backoff"] = retry_backoff_ms(settings.backfill_retry_window_ms, 3)
    run_backfill.options["time_limit"] = backfill.run_time_limit_ms(settings.nylas_timeout_s)
    sync_thread.options["min_backoff"] = retry_backoff_ms(settings.thread_retry_window_ms, 5)
    scheduler = next(m for m in broker.middleware if isinstance(m, PeriodicScheduler))
    scheduler.register(check_completion, settings.completion_check_interval_ms)
    if settings.enable_auto_recovery:
        scheduler.register(recover_completions, settings.recovery_check_interval_ms)


# Last in the list, so first of the after_process_boot hooks (Dramatiq runs after_* hooks in reverse): the others run
# with the settings it applied and log through the sink it sets up.
broker.add_middleware(WorkerBoot(configure_worker))
