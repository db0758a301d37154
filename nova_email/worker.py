"""What a worker process needs besides its actors: the broker with its middleware, and the Nylas client.

`build_broker` is called once when `nova_email.actors` is imported (that is how ``dramatiq
nova_email.actors`` finds its broker), without reading any setting: `configure_broker` applies the settings when a
worker process boots. `nylas_client` and the pool are per process, created on first use, so forked workers never
share sockets.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware, Retries

from brokers import KEEP_ON_ACK_OPTION, PeriodicScheduler, PerProcess, PGMQBroker, use_rate_limit_retries
from brokers.consumer import PGMQMessageProxy

from . import db
from .config import Settings
from .nylas.client import DEFAULT_POOL_MAXSIZE, NylasClient
from .nylas.pacing import Pacer, start_job
from .ops.health import WorkerHeartbeat
from .ops.metrics import add_metrics

__all__ = [
    "GiveUpHook",
    "PacedJobs",
    "TestingMode",
    "build_broker",
    "configure_broker",
    "nylas_client",
    "nylas_http_connections",
]

_client_lock = threading.Lock()
_client: PerProcess[NylasClient] | None = None


class GiveUpHook(Middleware):
    """Calls an actor's ``on_give_up(message, exception)`` once its last attempt failed and it was dead-lettered.

    It runs after the nack, in the worker thread, and only when the nack recorded the dead letter: a worker whose
    lease lapsed (frozen, cut off) while another took the message changes nothing, so it must not mark the domain
    row (a thread, a webhook audit row) failed under the worker that holds it now. A worker that dies between the
    dead letter and the hook leaves the row as it was; the dead letter says what happened.
    """

    @property
    def actor_options(self) -> set[str]:
        return {"on_give_up"}

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if not isinstance(message, PGMQMessageProxy) or not message.lease.dead_lettered:
            return
        actor = broker.actors.get(message.actor_name)
        hook = actor.options.get("on_give_up") if actor is not None else None
        if hook is not None and message.exception is not None:
            hook(message, message.exception)


class PacedJobs(Middleware):
    """Tells the pacer where each job starts: its first Nylas call never sleeps on a saturated grant (see pacing)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        start_job()


class TestingMode(Middleware):
    """TESTING_MODE: webhook jobs are processed but stay on their queue (the original service's dry run).

    The broker leaves a message marked so in place on ack; it becomes visible again after the visibility timeout
    and is processed again, without end. Unlike the original, which left the audit row at ``processing``, each run
    records its outcome: the row shows the latest run (``processed`` or ``ignored``, its ``processed_at`` and
    duration) with ``attempts`` 1, since a kept message coming back is not a retry. The event itself is applied
    each time (idempotently), so the mirror is written too.
    """

    def __init__(self, queues: set[str]) -> None:
        self.queues = queues

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.queue_name in self.queues:
            message.options[KEEP_ON_ACK_OPTION] = True


def build_broker() -> PGMQBroker:
    """The PGMQ broker with rate-limit-aware retries, periodic ticks and give-up hooks; reads no setting.

    Enough to send jobs (the database is resolved on the first send); a worker process gets its settings from
    `configure_broker` when it boots.
    """
    # One pool per process for the broker, its lease keeper and scheduler, the processors and the pacer
    # (DATABASE_POOL_SIZE), plus the listener's one LISTEN connection.
    defaults = Settings()  # the settings' defaults, until `configure_broker`
    broker = PGMQBroker(
        database=db.database(),
        visibility_timeout_s=defaults.visibility_timeout_s,
        poll_interval_ms=defaults.poll_interval_ms,
    )
    use_rate_limit_retries(broker)
    broker.add_middleware(CurrentMessage())  # lets an actor read its attempt number (retries + 1)
    broker.add_middleware(PeriodicScheduler())
    broker.add_middleware(PacedJobs())
    # Dramatiq runs after_* hooks in reverse order: placed before Retries, the hook runs after Retries marked the
    # message failed (appended last, it ran first and never saw a failed message).
    broker.add_middleware(GiveUpHook(), before=Retries)
    broker.add_middleware(WorkerHeartbeat())  # read by `nova-email healthcheck --worker`
    return broker


def configure_broker(broker: PGMQBroker, settings: Settings) -> None:
    """Apply the settings of a booting worker process to `broker`, before it consumes anything.

    Sets the visibility timeout, the poll interval and LISTEN (off behind a transaction pooler) of the broker's
    settlement and threads, which read them when consuming starts, and adds the metrics and testing-mode middleware
    the settings ask for.
    """
    visibility_timeout_ms = settings.visibility_timeout_s * 1000
    listen = not settings.database_transaction_pooler
    broker.visibility_timeout_ms = broker.settlement.visibility_timeout_ms = visibility_timeout_ms
    broker.threads.visibility_timeout_ms = visibility_timeout_ms
    broker.poll_interval_ms = broker.settlement.poll_interval_ms = settings.poll_interval_ms
    broker.listen = broker.threads.listen = listen
    broker.prepare_statements = not settings.database_transaction_pooler
    add_metrics(broker, settings)
    if settings.testing_mode:
        broker.add_middleware(TestingMode({"nylas_webhook_notifications"}))


def nylas_client(settings: Settings) -> NylasClient:
    """This process's Nylas client (one pooled HTTP session), paced through the shared buckets."""
    global _client
    with _client_lock:
        if _client is None:
            _client = PerProcess(lambda: _build_client(settings))
    return _client.get()


def nylas_http_connections(broker: dramatiq.Broker) -> int:
    """HTTP connections this process's Nylas client keeps: one per worker thread, and never fewer than the default.

    Read when the client is built, on a process's first job, after its worker booted and counted its threads.
    """
    threads = broker.settlement.slots.threads if isinstance(broker, PGMQBroker) else None
    return max(threads or 0, DEFAULT_POOL_MAXSIZE)


def _build_client(settings: Settings) -> NylasClient:
    pacer = None
    if settings.pacing_enabled or settings.api_delay_ms:
        pacer = Pacer(
            db.get_pool(settings).connection,
            grant_rate_per_s=settings.nylas_grant_rate or None,
            grant_burst=settings.nylas_grant_burst,
            app_rate_per_s=settings.nylas_app_rate or None,
            min_interval_ms=settings.api_delay_ms,
        )
    return NylasClient(
        api_key=settings.nylas_api_key,
        api_uri=settings.nylas_api_uri,
        timeout_s=settings.nylas_timeout_s,
        pacer=pacer,
        pool_maxsize=nylas_http_connections(dramatiq.get_broker()),
    )
