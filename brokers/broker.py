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

import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, LiteralString

import attrs
import psycopg
from dramatiq.broker import Broker, Consumer
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware, MiddlewareError
from loguru import logger
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import dead_letters as _dead_letters
from . import queries
from .consumer import _log_stale, _PGMQConsumer, _PGMQMessageProxy, _QueueState, _Settlement
from .dead_letters import DeadLetter
from .errors import DatabaseUnavailable, InvalidQueueName
from .lease import LeaseKeeper
from .listener import Listener

__all__ = ["PGMQBroker", "QueueMetrics", "validate_queue_name"]

log = logger.bind(component="PGMQBroker")

#: Seconds a fetched message stays hidden before another worker may take it; the heartbeat extends it.
DEFAULT_VISIBILITY_TIMEOUT_S = 30
#: Longest wait, in milliseconds, of an idle consumer between two reads (notifications usually come first).
DEFAULT_POLL_INTERVAL_MS = 500
#: Deliveries without a settlement after which a message is dead-lettered as poison.
DEFAULT_MAX_DELIVERIES = 5
#: Seconds after which the heartbeat gives up on a running message and lets it be redelivered.
DEFAULT_MAX_LEASE_S = 3600
#: Seconds archived messages are kept when ``archive_on_ack`` is on.
DEFAULT_ARCHIVE_RETENTION_S = 7 * 86400
#: Connections per process in the broker's own pool.
DEFAULT_POOL_MAX_SIZE = 16
#: Seconds to wait for a pooled connection before reporting the database unavailable.
DEFAULT_POOL_TIMEOUT_S = 5.0
#: Messages per ``pgmq.send_batch`` call in ``enqueue_many``.
DEFAULT_BATCH_SIZE = 500
#: Seconds between two purges of acknowledged messages from the archive.
ARCHIVE_PURGE_INTERVAL_S = 600

#: Longest queue name PGMQ accepts (its partitioned table names must fit in 63 characters).
MAX_QUEUE_NAME_LENGTH = 47
_QUEUE_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def validate_queue_name(queue_name: str) -> str:
    """Return `queue_name` if PGMQ can hold it, else raise :class:`InvalidQueueName` saying what would work."""
    if _QUEUE_NAME.fullmatch(queue_name) and len(queue_name) <= MAX_QUEUE_NAME_LENGTH:
        return queue_name
    suggestion = re.sub(r"[^a-z0-9_]", "_", queue_name.lower())[:MAX_QUEUE_NAME_LENGTH] or "default"
    if suggestion[0].isdigit():
        suggestion = "q_" + suggestion[: MAX_QUEUE_NAME_LENGTH - 2]
    msg = (
        f"Queue name {queue_name!r} cannot be a PGMQ queue: use lower-case letters, digits and underscores, "
        f"starting with a letter or underscore, at most {MAX_QUEUE_NAME_LENGTH} characters (e.g. {suggestion!r}). "
        "PGMQ folds table names to lower case and its insert notifications break for upper-case names."
    )
    raise InvalidQueueName(msg, queue_name=queue_name)


@attrs.frozen(kw_only=True)
class QueueMetrics:
    """A snapshot of one queue (``PGMQBroker.metrics``)."""

    queue_name: str
    #: Messages ready to run now.
    queued: int
    #: Messages waiting for their delay.
    delayed: int
    #: Messages leased by a worker (buffered or running).
    in_flight: int
    #: Age of the oldest ready message, in milliseconds (0 when none).
    oldest_age_ms: float
    #: Dead letters recorded for the queue.
    dead_lettered: int


class _Outage:
    """Logs a database outage once when it starts and once when it ends."""

    def __init__(self) -> None:
        self.since: float | None = None
        self._lock = threading.Lock()

    def lost(self, exc: BaseException) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                log.bind(event="database_lost").warning("Lost the database, retrying with backoff: {}", exc)

    def recovered(self, started_at: float) -> None:
        """Log the end of the outage, if a call that `started_at` (monotonic) after it began succeeded."""
        with self._lock:
            # A call already under way when the server went down may still finish; that proves nothing.
            if self.since is not None and started_at > self.since:
                log.bind(event="database_recovered").info(
                    "Database reachable again after {:.1f} s", time.monotonic() - self.since
                )
                self.since = None


class _QueueHandlerOption(Middleware):
    """Registers the ``queue_handler`` actor option: the actor receives the queue's foreign JSON messages."""

    @property
    def actor_options(self) -> set[str]:
        return {"queue_handler"}


class _DeliveryStart(Middleware):
    """Counts a delivery towards ``max_deliveries`` when it starts running, not when it is fetched.

    The first ``before_process_message`` hook: a message buffered behind a job that kills its process never ran,
    and its count stays. A delivery whose lease is gone is skipped instead of run.
    """

    def before_process_message(self, broker: Broker, message: Any) -> None:
        if isinstance(message, _PGMQMessageProxy) and isinstance(broker, PGMQBroker):
            broker._settle_start(message)


class PGMQBroker(_Settlement, Broker):
    """A Dramatiq broker over PGMQ queues in Postgres.

    Nothing touches the network in ``__init__``: the pool is opened lazily, in the process that first uses it
    (so a pool is never shared across a fork).

    Parameters:
        url: A libpq connection string. Either this or `pool`.
        pool: An existing psycopg ``ConnectionPool`` (you own its lifetime); its connections must be usable in
            autocommit mode.
        middleware: As for every Dramatiq broker (default: Dramatiq's default middleware).
        visibility_timeout_s: How long a fetched message stays hidden; the heartbeat extends it while held.
        poll_interval_ms: Longest idle wait between reads.
        max_deliveries: Deliveries without a settlement before a message is dead-lettered as poison.
        max_lease_s: How long the heartbeat keeps extending a running message.
        archive_on_ack: Move acknowledged messages to PGMQ's archive table instead of deleting them.
        archive_retention_s: How long archived messages are kept (purged by the heartbeat thread).
        listen: Wake idle consumers with LISTEN/NOTIFY. Turn off behind transaction-mode poolers.
        prepare_statements: Let psycopg prepare hot statements. Turn off behind transaction-mode poolers.
        async_commit: Commit the consumer's bookkeeping (leases, acks, heartbeats) without waiting for the WAL
            flush. A server crash may then forget the last few hundred milliseconds of it, which makes those
            messages run again (never lost). Enqueues and dead letters always commit durably.
        pool_min_size, pool_max_size, pool_timeout_s: The broker's own pool (ignored when `pool` is given).
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        pool: ConnectionPool | None = None,
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
        if (url is None) == (pool is None):
            msg = "PGMQBroker needs exactly one of url= (a libpq connection string) or pool= (a psycopg ConnectionPool)"
            raise ValueError(msg)
        self._hook_cache: tuple[tuple[Middleware, ...], dict[str, list[Any]]] = ((), {})
        super().__init__(middleware=middleware)
        self.add_middleware(_QueueHandlerOption())
        if self.middleware:
            self.add_middleware(_DeliveryStart(), before=type(self.middleware[0]))
        else:
            self.add_middleware(_DeliveryStart())
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
        self._given_pool = pool
        self._pool_sizes = (pool_min_size, pool_max_size)
        self._pool_timeout_s = pool_timeout_s
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.RLock()
        self._created: set[str] = set()
        self._send_queries: dict[str, bytes] = {}
        self._states: dict[str, _QueueState] = {}
        self._handlers: dict[str, str] = {}
        self._keeper: LeaseKeeper | None = None
        self._listener: Listener | None = None
        self._outage = _Outage()
        self._last_archive_purge = 0.0

    # -- connections ------------------------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "prepare_threshold": 5 if self.prepare_statements else None}

    def _get_pool(self) -> ConnectionPool:
        if self._given_pool is not None:
            return self._given_pool
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # After a fork the parent's pool belongs to the parent: leave it alone and open our own.
                min_size, max_size = self._pool_sizes
                self._pool = ConnectionPool(
                    self.url or "",
                    min_size=min_size,
                    max_size=max_size,
                    timeout=self._pool_timeout_s,
                    kwargs=self._connect_kwargs(),
                    name="pgmq-broker",
                    open=True,
                )
                self._pid = os.getpid()
                self._keeper = None
                self._listener = None
            return self._pool

    @property
    def pool(self) -> ConnectionPool:
        """This process's connection pool (opened on first use); borrow from it for work next to the broker's."""
        return self._get_pool()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; connection failures become :class:`DatabaseUnavailable`."""
        pool = self._get_pool()
        started_at = time.monotonic()
        try:
            with pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(exc, pool) from exc
        if self._outage.since is not None:
            self._outage.recovered(started_at)

    def _execute(self, query: LiteralString | bytes, params: dict[str, Any]) -> list[Any]:
        """Run one statement on a pooled connection and return its rows: the hot path, without context managers."""
        pool = self._get_pool()
        started_at = time.monotonic()
        try:
            conn = pool.getconn()
            try:
                cursor = conn.execute(query, params)
                rows = cursor.fetchall() if cursor.description is not None else []
            finally:
                pool.putconn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(exc, pool) from exc
        if self._outage.since is not None:
            self._outage.recovered(started_at)
        return rows

    def _unavailable(self, exc: BaseException, pool: ConnectionPool) -> DatabaseUnavailable:
        self._outage.lost(exc)
        try:
            # Replace the connections that died with the server now, not one failed call at a time.
            pool.check()
        except Exception:
            log.opt(exception=True).debug("Pool check failed during an outage")
        msg = f"The database is unavailable ({type(exc).__name__}: {exc}); the broker retries with backoff"
        return DatabaseUnavailable(msg)

    @contextmanager
    def _raw_connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._get_pool().connection() as conn:
            yield conn

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
        current = self._handlers.get(queue_name)
        if current is not None and current != actor_name:
            msg = f"Queue {queue_name!r} already has the handler {current!r}; a queue has at most one ({actor_name!r})"
            raise ValueError(msg)
        self._handlers[queue_name] = actor_name

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

    def _ensure_queue(self, queue_name: str) -> None:
        if queue_name in self._created:
            return
        validate_queue_name(queue_name)
        with self._connection() as conn:
            conn.execute(queries.CREATE_QUEUE, {"queue": queue_name})
        self._created.add(queue_name)

    def _send_query(self, queue_name: str) -> bytes:
        query = self._send_queries.get(queue_name)
        if query is None:
            table = sql.Identifier(f"q_{validate_queue_name(queue_name)}")
            query = self._send_queries[queue_name] = queries.SEND_TO_TABLE.format(table=table).as_bytes(None)
        return query

    def _queue_state(self, queue_name: str) -> _QueueState:
        state = self._states.get(queue_name)
        if state is None:
            with self._lock:
                state = self._states.setdefault(queue_name, _QueueState(queue_name))
        return state

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
        self._ensure_queue(queue_name)
        proxy = message if isinstance(message, _PGMQMessageProxy) and self._resendable(message) else None
        if proxy is not None:
            proxy._resend_pending = True
        self.emit_before("enqueue", message, delay)
        params = {"queue": queue_name, "message": message.encode().decode("utf-8"), "delay_ms": int(delay or 0)}
        if proxy is not None:
            try:
                self._resend(proxy, params, connection)
            except DatabaseUnavailable as exc:
                if connection is not None:
                    raise
                # _resend_pending stays set: the ack leaves the original to run again.
                log.bind(event="retry_not_enqueued").log(
                    "DEBUG" if self._outage.since is not None else "WARNING",
                    "Could not re-enqueue message {} ({}); it runs again once its lease lapses",
                    message.message_id,
                    exc,
                )
                return message
        elif connection is not None:
            connection.execute(self._send_query(queue_name), params)
        else:
            self._execute(self._send_query(queue_name), params)
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
            self._ensure_queue(queue_name)
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
                    with self._connection() as conn:
                        conn.execute(queries.SEND_BATCH, params)
                for message in chunk:
                    self.emit_after("enqueue", message, delay)
                sent.extend(chunk)
        return sent

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_before``, calling only the middleware that define the hook (see :meth:`_hooks`)."""
        name = "before_" + signal
        for hook in self._hooks(name):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical(
                    "Unexpected failure in %s of %r.", name, getattr(hook, "__self__", hook), exc_info=True
                )

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_after`` (hooks in reverse order), calling only the middleware that define the hook."""
        name = "after_" + signal
        for hook in reversed(self._hooks(name)):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical(
                    "Unexpected failure in %s of %r.", name, getattr(hook, "__self__", hook), exc_info=True
                )

    def _hooks(self, name: str) -> list[Any]:
        """The bound `name` hooks of the middleware that override Dramatiq's no-op, in middleware order.

        Dramatiq's emit calls every middleware's hook by name, most of them the base class's no-op: per message
        of a fan-out that was a fifth of the enqueue time. Kept per middleware list, so a middleware added or
        removed later takes part from the next signal on.
        """
        middleware = tuple(self.middleware)
        known, hooks = self._hook_cache
        if known != middleware:
            hooks = {}
            self._hook_cache = (middleware, hooks)
        found = hooks.get(name)
        if found is None:
            base = getattr(Middleware, name, None)
            found = hooks[name] = [
                hook
                for hook in (getattr(m, name, None) for m in middleware)
                if hook is not None and getattr(hook, "__func__", None) is not base
            ]
        return found

    def _resendable(self, proxy: _PGMQMessageProxy) -> bool:
        return proxy._consumer._broker is self and not proxy._settled

    def _resend(
        self, proxy: _PGMQMessageProxy, params: dict[str, Any], connection: psycopg.Connection[Any] | None
    ) -> None:
        lease = proxy._lease
        lease.settling = True
        params = {**params, "old_queue": lease.queue_name, "old_msg_id": lease.msg_id, "old_token": lease.token}
        if connection is not None:
            row = connection.execute(queries.RESEND, params).fetchone()
        else:
            with self._connection() as conn:
                row = conn.execute(queries.RESEND, params).fetchone()
        proxy._resend_pending = False
        proxy._settled = True
        self._keeper_forget([lease])
        proxy._consumer._discharge(proxy)
        if row is None or row[0] is None:
            _log_stale("retry", lease)

    # -- consuming --------------------------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """Create a consumer of `queue_name` that holds at most `prefetch` messages and idles up to `timeout` ms."""
        self._ensure_queue(queue_name)
        return _PGMQConsumer(self, queue_name, prefetch, timeout)

    def _start_consuming(self, queue_name: str) -> None:
        """Start this process's heartbeat and listener threads and subscribe to `queue_name`'s inserts."""
        pool = self._get_pool()
        with self._lock:
            if self._keeper is None:
                self._keeper = LeaseKeeper(
                    connect=self._raw_connection,
                    visibility_timeout_ms=self.visibility_timeout_ms,
                    max_lease_s=self.max_lease_s,
                    async_commit=self.async_commit,
                    on_tick=self._purge_archives if self.archive_on_ack else None,
                )
            self._keeper.start()
            if self.listen:
                if self._listener is None:
                    # psycopg_pool also accepts callables for both (credentials that rotate).
                    conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
                    kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
                    self._listener = Listener(conninfo=conninfo, connect_kwargs=kwargs or {}, on_notify=self._notify)
                self._listener.subscribe(queue_name)
                self._listener.start()

    def _notify(self, queue_name: str) -> None:
        state = self._states.get(queue_name)
        if state is not None:
            for consumer in list(state.consumers):
                consumer.wake()

    # -- queue management -------------------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        """Drop every message of a queue (dead letters are kept; see :meth:`purge_dead_letters`)."""
        self._ensure_queue(queue_name)
        with self._connection() as conn:
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
        self._ensure_queue(queue_name)
        query = sql.SQL(queries.QUEUE_SIZE).format(table=sql.Identifier(f"q_{queue_name}"))
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            with self._connection() as conn:
                row = conn.execute(query).fetchone()
            if row is not None and row[0] == 0:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
            time.sleep(interval / 1000)

    def metrics(self, queue_name: str) -> QueueMetrics:
        """Depth, delayed, in-flight, oldest age and dead-letter count of a queue, in one query."""
        self._ensure_queue(queue_name)
        with self._connection() as conn:
            row = conn.execute(queries.QUEUE_METRICS, {"queue": queue_name}).fetchone()
        queued, delayed, in_flight, oldest_age_ms, dead = row or (0, 0, 0, 0.0, 0)
        return QueueMetrics(
            queue_name=queue_name,
            queued=queued,
            delayed=delayed,
            in_flight=in_flight,
            oldest_age_ms=float(oldest_age_ms),
            dead_lettered=dead,
        )

    def enable_notify(self, queue_name: str) -> None:
        """Create the queue if needed and wake idle workers on its inserts. For set-up code, like a migration.

        Same as ``select pgmq_broker.enable_notify('queue')`` in SQL: one unthrottled notification per insert
        statement (Postgres folds them per transaction), replacing PGMQ's throttled row trigger if present.
        """
        validate_queue_name(queue_name)
        with self._connection() as conn:
            conn.execute(queries.ENABLE_NOTIFY, {"queue": queue_name})
        self._created.add(queue_name)

    def _purge_archives(self) -> None:
        if time.monotonic() - self._last_archive_purge < ARCHIVE_PURGE_INTERVAL_S:
            return
        self._last_archive_purge = time.monotonic()
        for queue_name in list(self._created):
            try:
                self.purge_archive(queue_name)
            except DatabaseUnavailable:
                return  # the outage is logged once already; the next tick tries again

    def purge_archive(self, queue_name: str, *, older_than_s: int | None = None) -> int:
        """Delete archived messages older than `older_than_s` (default: the retention); returns how many."""
        older = self.archive_retention_s if older_than_s is None else older_than_s
        with self._connection() as conn:
            row = conn.execute(queries.PURGE_ARCHIVE, {"queue": queue_name, "older_than_s": older}).fetchone()
        return int(row[0]) if row else 0

    # -- dead letters -----------------------------------------------------------------------------------------

    def dead_letters(self, queue_name: str | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest `limit` dead letters, of one queue or of all."""
        with self._connection() as conn:
            return _dead_letters.list_dead_letters(conn, queue_name=queue_name, limit=limit)

    def count_dead_letters(self, queue_name: str | None = None) -> int:
        """How many dead letters there are, of one queue or of all."""
        with self._connection() as conn:
            return _dead_letters.count_dead_letters(conn, queue_name=queue_name)

    def purge_dead_letters(self, queue_name: str | None = None, *, older_than_s: int | None = None) -> int:
        """Delete dead letters, of one queue or all, optionally only those older than `older_than_s`."""
        with self._connection() as conn:
            return _dead_letters.purge_dead_letters(conn, queue_name=queue_name, older_than_s=older_than_s)

    def replay_dead_letters(
        self, queue_name: str | None = None, *, ids: list[int] | None = None, limit: int | None = None
    ) -> int:
        """Send dead letters back to their queues with a fresh retry budget; returns how many."""
        with self._connection() as conn:
            return _dead_letters.replay_dead_letters(conn, queue_name=queue_name, ids=ids, limit=limit)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete pending acks, make buffered messages visible again, stop the threads and close the pool."""
        for state in list(self._states.values()):
            for consumer in list(state.consumers):
                try:
                    consumer.close()
                except DatabaseUnavailable as exc:
                    log.warning("Could not settle queue {!r} on close: {}", state.name, exc)
            try:
                self._flush_acks(state)
            except DatabaseUnavailable as exc:
                log.warning("Could not delete acknowledged messages on close: {}", exc)
        with self._lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
            if self._keeper is not None:
                self._keeper.stop()
                self._keeper = None
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None
            self._created.clear()
