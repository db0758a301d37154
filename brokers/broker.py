"""PGMQBroker: a Dramatiq 2.x broker that keeps its queues in Postgres, with PGMQ.

Usage, in the module the ``dramatiq`` CLI imports::

    broker = PGMQBroker(url="postgresql://app@db/app")
    dramatiq.set_broker(broker)

Before the first worker starts, install the schema once (``brokers.schema.install(conn)``), and enable insert
notifications for each queue from a migration (``select pgmq_broker.enable_notify('my_queue')``) so idle
workers wake within milliseconds; without them workers still poll every ``poll_interval_ms``.

Guarantees: a message is deleted only after its actor finished (at-least-once); a retry replaces its original
in one transaction; a message held by a live worker is never handed to another (visibility heartbeat); a dead
worker's messages come back within ``visibility_timeout_s``; anything that cannot run is dead-lettered with its
reason, never dropped and never retried forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import psycopg
from dramatiq.broker import Broker, Consumer
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from loguru import logger
from psycopg import sql
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from . import dead_letters, queries
from .consumer import PGMQConsumer, PGMQMessageProxy, WorkerThreads
from .database import DEFAULT_POOL_MAX_SIZE, DEFAULT_POOL_TIMEOUT_S, Database, fetch_scalar
from .dead_letters import DeadLetter
from .envelope import QueueHandlerOption
from .errors import DatabaseUnavailable
from .fairness import FairnessKeys
from .hooks import MiddlewareHooks
from .process_threads import ProcessThreads
from .queues import QueueMetrics, QueueTables, validate_queue_name
from .settlement import Settlement

__all__ = ["PGMQBroker"]

log = logger.bind(component="PGMQBroker")

#: Seconds a fetched message stays hidden before another worker may take it; the heartbeat extends it.
DEFAULT_VISIBILITY_TIMEOUT_S = 30
#: Longest wait, in milliseconds, of an idle consumer between two reads (notifications usually come first).
DEFAULT_POLL_INTERVAL_MS = 500
#: Runs started without a settlement after which a message is dead-lettered as poison (a worker died in each).
DEFAULT_MAX_DELIVERIES = 5
#: Seconds after which the heartbeat gives up on a running message and lets it be redelivered.
DEFAULT_MAX_LEASE_S = 3600
#: Seconds archived messages are kept when ``archive_on_ack`` is on.
DEFAULT_ARCHIVE_RETENTION_S = 7 * 86400
#: Messages per ``pgmq.send_batch`` call in ``enqueue_many``.
DEFAULT_BATCH_SIZE = 500
#: Seconds between two purges of acknowledged messages from the archive.
ARCHIVE_PURGE_INTERVAL_S = 600


class PGMQBroker(Broker):
    """A Dramatiq broker over PGMQ queues in Postgres.

    Nothing touches the network in ``__init__``: the pool is opened lazily, in the process that first uses it
    (so a pool is never shared across a fork).

    Parameters:
        url: A libpq connection string. One of this, `pool` or `database`.
        pool: An existing psycopg ``ConnectionPool`` (you own its lifetime); its connections must be usable in
            autocommit mode.
        database: A :class:`~brokers.Database` to share with other users of the database in this process (the
            periodic scheduler, a rate-limit backend, the application): one pool for all (you own its lifetime).
        middleware: As for every Dramatiq broker (default: Dramatiq's default middleware).
        visibility_timeout_s: How long a fetched message stays hidden; the heartbeat extends it while held.
        poll_interval_ms: Longest idle wait between reads.
        max_deliveries: Runs started without a settlement before a message is dead-lettered as poison.
        max_lease_s: How long the heartbeat keeps extending a running message.
        archive_on_ack: Move acknowledged messages to PGMQ's archive table instead of deleting them.
        archive_retention_s: How long archived messages are kept (purged by the heartbeat thread).
        listen: Wake idle consumers with LISTEN/NOTIFY. Turn off behind transaction-mode poolers.
        prepare_statements: Let psycopg prepare hot statements. Turn off behind transaction-mode poolers.
        async_commit: Commit the consumer's bookkeeping (leases, acks, heartbeats) without waiting for the WAL
            flush. A server crash may then forget the last few hundred milliseconds of it, which makes those
            messages run again (never lost). Enqueues and dead letters always commit durably.
        pool_min_size, pool_max_size, pool_timeout_s: The broker's own pool (with `url` only).
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        pool: ConnectionPool | None = None,
        database: Database | None = None,
        middleware: list[Middleware] | None = None,
        visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_lease_s: float = DEFAULT_MAX_LEASE_S,
        archive_on_ack: bool = False,
        archive_retention_s: int = DEFAULT_ARCHIVE_RETENTION_S,
        listen: bool = True,
        prepare_statements: bool = True,
        async_commit: bool = True,
        pool_min_size: int = 1,
        pool_max_size: int = DEFAULT_POOL_MAX_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ) -> None:
        if sum(given is not None for given in (url, pool, database)) != 1:
            msg = "PGMQBroker needs exactly one of url= (a libpq string), pool= (a ConnectionPool) or database="
            raise ValueError(msg)
        #: The middleware hooks each signal calls (Dramatiq's base ``__init__`` already sends signals).
        self.hooks = MiddlewareHooks()
        super().__init__(middleware=middleware)
        self.add_middleware(QueueHandlerOption())
        self.add_middleware(FairnessKeys())
        self.url = url
        self.visibility_timeout_ms = int(visibility_timeout_s * 1000)
        self.poll_interval_ms = poll_interval_ms
        self.max_deliveries = max_deliveries
        self.max_lease_s = max_lease_s
        self.archive_on_ack = archive_on_ack
        self.archive_retention_s = archive_retention_s
        self.listen = listen
        self.prepare_statements = prepare_statements
        self.async_commit = async_commit
        self.queues: set[str] = set()
        self._owns_database = database is None
        #: Where the queues are: this process's pool, and the outage it may be in.
        self.database = database or Database(
            url,
            pool=pool,
            name="pgmq-broker",
            min_size=pool_min_size,
            max_size=pool_max_size,
            timeout_s=pool_timeout_s,
            prepare_statements=prepare_statements,
        )
        #: The commands that lease and settle deliveries, held by every consumer of this broker.
        self.settlement = Settlement(
            self.database,
            visibility_timeout_ms=self.visibility_timeout_ms,
            poll_interval_ms=poll_interval_ms,
            archive_on_ack=archive_on_ack,
            async_commit=async_commit,
        )
        self.add_middleware(WorkerThreads(self.settlement.slots))
        #: The actor that takes each queue's foreign messages (see :meth:`set_queue_handler`).
        self.queue_handlers: dict[str, str] = {}
        #: The lease keeper and the LISTEN thread of this process.
        self.threads = ProcessThreads(
            self.database,
            self.settlement,
            visibility_timeout_ms=self.visibility_timeout_ms,
            max_lease_s=max_lease_s,
            async_commit=async_commit,
            on_tick=self._purge_archives if archive_on_ack else None,
            listen=listen,
            on_notify=self._notify,
        )
        self.tables = QueueTables(self.database)
        self._last_archive_purge = 0.0

    @property
    def pool(self) -> ConnectionPool:
        """This process's connection pool (opened on first use); borrow from it for work next to the broker's."""
        return self.database.pool

    # -- declarations -----------------------------------------------------------------------------------------

    def declare_actor(self, actor: Any) -> None:
        """Declare an actor; one declared with ``queue_handler=True`` receives its queue's foreign messages."""
        super().declare_actor(actor)
        if actor.options.get("queue_handler"):
            self.set_queue_handler(actor.queue_name, actor.actor_name)

    def set_queue_handler(self, queue_name: str, actor_name: str) -> None:
        """Route `queue_name`'s foreign messages (plain JSON objects) to `actor_name` as its single argument.

        Raises:
            ValueError: Another actor already handles that queue.
        """
        current = self.queue_handlers.get(queue_name)
        if current is not None and current != actor_name:
            msg = f"Queue {queue_name!r} already has the handler {current!r}; a queue has at most one ({actor_name!r})"
            raise ValueError(msg)
        self.queue_handlers[queue_name] = actor_name

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue (idempotent). The PGMQ queue itself is created on first use, in the using process.

        Raises:
            InvalidQueueName: PGMQ cannot hold the name.
        """
        if queue_name not in self.queues:
            validate_queue_name(queue_name)
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def create_queue(self, queue_name: str) -> None:
        """Create the PGMQ queue unless this process did already (enqueue and consume call it; safe to race)."""
        self.tables.create(queue_name)

    # -- enqueueing -------------------------------------------------------------------------------------------

    def enqueue(
        self, message: Message[Any], *, delay: int | None = None, connection: psycopg.Connection[Any] | None = None
    ) -> Message[Any]:
        """Enqueue a message, visible after `delay` milliseconds (computed by the database's clock).

        Transactional enqueue: pass `connection` to send on the caller's connection, inside whatever
        transaction it has open; the message becomes visible only if that transaction commits. (Middleware
        ``after_enqueue`` hooks still run at once.)

        Re-enqueueing a message this broker delivered (Dramatiq's Retries does that with the message being
        processed) replaces the delivery atomically: the new message is sent and the original deleted in one
        transaction, and the later ack is a no-op. If that fails, the ack leaves the original to be redelivered,
        so a failed retry loses nothing; when it fails because the database is unavailable (and no `connection`
        was given), this says so in one log line (at debug during an outage, which the broker logs once) and
        returns, instead of raising into the retrying middleware.

        Raises:
            DatabaseUnavailable: The database could not be reached (for a message this broker delivered, only
                with `connection`).
            InvalidQueueName: The message's queue cannot be a PGMQ queue.
        """
        queue_name = message.queue_name
        self.create_queue(queue_name)
        proxy = message if isinstance(message, PGMQMessageProxy) and self._delivered_here(message) else None
        if proxy is not None:
            # Set before any hook runs: whatever fails from here on, the ack keeps the original.
            proxy.lease.resend_pending = True
        self.emit_before("enqueue", message, delay)
        params = {"queue": queue_name, "message": message.encode().decode("utf-8"), "delay_ms": int(delay or 0)}
        if proxy is not None:
            try:
                if not proxy.consumer.resend(proxy, params, connection):
                    return message  # stale: nothing was sent (logged once), so no middleware hears of an enqueue
            except DatabaseUnavailable as exc:
                if connection is not None:
                    raise
                # lease.resend_pending stays set: the ack leaves the original to run again.
                log.bind(event="retry_not_enqueued").log(
                    "DEBUG" if self.database.outage.ongoing else "WARNING",
                    "Could not re-enqueue message {} ({}); it runs again once its lease lapses",
                    message.message_id,
                    exc,
                )
                return message
        else:  # in the caller's transaction when it gave one
            (connection or self.database).execute(self.tables.send_query(queue_name), params)
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_many(
        self,
        messages: Iterable[Message[Any]],
        *,
        delay: int | None = None,
        connection: psycopg.Connection[Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[Message[Any]]:
        """Enqueue many messages with one ``pgmq.send_batch`` per queue and chunk of `batch_size`.

        Use it for fan-out. With `connection`, the messages are sent in the caller's transaction (see
        :meth:`enqueue`). Middleware hooks run per message, as for ``enqueue``.
        """
        by_queue: dict[str, list[Message[Any]]] = {}
        for message in messages:
            by_queue.setdefault(message.queue_name, []).append(message)
        sent: list[Message[Any]] = []
        for queue_name, group in by_queue.items():
            self.create_queue(queue_name)
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                for message in chunk:
                    self.emit_before("enqueue", message, delay)
                params = {
                    "queue": queue_name,
                    "messages": "[" + ",".join(m.encode().decode("utf-8") for m in chunk) + "]",
                    "delay_ms": int(delay or 0),
                }
                if connection is not None:
                    connection.execute(queries.SEND_BATCH, params)
                else:
                    with self.database.connection() as conn:
                        conn.execute(queries.SEND_BATCH, params)
                for message in chunk:
                    self.emit_after("enqueue", message, delay)
                sent.extend(chunk)
        return sent

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_before``, calling only the middleware that define the hook (see ``brokers.hooks``)."""
        self.hooks.emit_before(self, signal, *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_after`` (hooks in reverse order), calling only the middleware that define the hook."""
        self.hooks.emit_after(self, signal, *args, **kwargs)

    def _delivered_here(self, message: PGMQMessageProxy) -> bool:
        """Whether `message` is an unsettled delivery of this broker (so enqueueing it is a retry that replaces it)."""
        return message.consumer.settlement is self.settlement and not message.lease.settled

    # -- consuming --------------------------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Create a consumer of `queue_name` that holds at most `prefetch` messages and idles up to `timeout` ms."""
        self.create_queue(queue_name)
        self.threads.start(queue_name)
        return PGMQConsumer(
            self.settlement,
            queue_name,
            prefetch,
            timeout,
            max_deliveries=self.max_deliveries,
            handlers=self.queue_handlers,
        )

    def _notify(self, queue_name: str) -> None:
        state = self.settlement.states.get(queue_name)
        if state is not None:
            for consumer in list(state.consumers):
                consumer.notify()

    # -- queue management -------------------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop every message of a queue (dead letters are kept; see :meth:`purge_dead_letters`)."""
        self.create_queue(queue_name)
        with self.database.connection() as conn:
            conn.execute(queries.FLUSH_QUEUE, {"queue": queue_name})

    def flush_all(self) -> None:
        """Drop every message of every declared queue."""
        for queue_name in self.queues:
            self.flush(queue_name)

    def join(self, queue_name: str, *, timeout: int | None = None, interval: int = 50) -> None:
        """Wait until `queue_name` holds nothing queued, delayed or in flight. Meant for tests.

        Raises:
            QueueJoinTimeout: `timeout` milliseconds passed first.
        """
        self.create_queue(queue_name)
        query = sql.SQL(queries.QUEUE_SIZE).format(table=sql.Identifier(f"q_{queue_name}"))
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            with self.database.connection() as conn:
                size = fetch_scalar(conn, query)
            if size == 0:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
            time.sleep(interval / 1000)

    def metrics(self, queue_name: str) -> QueueMetrics:
        """Depth, delayed, in-flight, oldest age and dead-letter count of a queue, in one query."""
        self.create_queue(queue_name)
        rows: list[QueueMetrics] = self.database.execute(
            queries.QUEUE_METRICS, {"queue": queue_name}, row_factory=class_row(QueueMetrics)
        )
        [metrics] = rows  # aggregates: always one row
        return metrics

    def enable_notify(self, queue_name: str) -> None:
        """Create the queue if needed and wake idle workers on its inserts. For set-up code, like a migration.

        Same as ``select pgmq_broker.enable_notify('queue')`` in SQL: one unthrottled notification per insert
        statement (Postgres folds them per transaction), replacing PGMQ's throttled row trigger if present.
        """
        validate_queue_name(queue_name)
        with self.database.connection() as conn:
            conn.execute(queries.ENABLE_NOTIFY, {"queue": queue_name})
        self.tables.created.add(queue_name)

    def _purge_archives(self) -> None:
        if time.monotonic() - self._last_archive_purge < ARCHIVE_PURGE_INTERVAL_S:
            return
        self._last_archive_purge = time.monotonic()
        for queue_name in list(self.tables.created):
            try:
                self.purge_archive(queue_name)
            except DatabaseUnavailable:
                return  # the outage is logged once already; the next tick tries again

    def purge_archive(self, queue_name: str, *, older_than_s: int | None = None) -> int:
        """Delete archived messages older than `older_than_s` (default: the retention); returns how many."""
        older = self.archive_retention_s if older_than_s is None else older_than_s
        with self.database.connection() as conn:
            return int(fetch_scalar(conn, queries.PURGE_ARCHIVE, {"queue": queue_name, "older_than_s": older}))

    # -- dead letters -----------------------------------------------------------------------------------------

    def dead_letters(self, queue_name: str | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest `limit` dead letters, of one queue or of all."""
        with self.database.connection() as conn:
            return dead_letters.list_dead_letters(conn, queue_name=queue_name, limit=limit)

    def count_dead_letters(self, queue_name: str | None = None) -> int:
        """How many dead letters there are, of one queue or of all."""
        with self.database.connection() as conn:
            return dead_letters.count_dead_letters(conn, queue_name=queue_name)

    def purge_dead_letters(self, queue_name: str | None = None, *, older_than_s: int | None = None) -> int:
        """Delete dead letters, of one queue or all, optionally only those older than `older_than_s`."""
        with self.database.connection() as conn:
            return dead_letters.purge_dead_letters(conn, queue_name=queue_name, older_than_s=older_than_s)

    def replay_dead_letters(
        self, queue_name: str | None = None, *, ids: list[int] | None = None, limit: int | None = None
    ) -> int:
        """Send dead letters back to their queues with a fresh retry budget; returns how many."""
        with self.database.connection() as conn:
            return dead_letters.replay_dead_letters(conn, queue_name=queue_name, ids=ids, limit=limit)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete pending acks, make buffered messages visible again, stop the threads and close the pool."""
        for state in list(self.settlement.states.values()):
            for consumer in list(state.consumers):
                try:
                    consumer.close()
                except DatabaseUnavailable as exc:
                    log.warning("Could not settle queue {!r} on close: {}", state.name, exc)
            try:
                self.settlement.flush_acks(state)
            except DatabaseUnavailable as exc:
                log.warning("Could not delete acknowledged messages on close: {}", exc)
        self.threads.stop()
        if self._owns_database:
            self.database.close()
        self.tables.created.clear()
