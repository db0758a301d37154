"""Dramatiq rate limits on Postgres: a shared backend, and retries that rate limits do not use up.

:class:`PostgresBackend` is a :class:`dramatiq.rate_limits.RateLimiterBackend`, so Dramatiq's own
``ConcurrentRateLimiter``, ``WindowRateLimiter``, ``BucketRateLimiter`` and ``Barrier`` work across every process and
machine that reaches the database, without Redis::

    backend = PostgresBackend(conninfo="postgresql://127.0.0.1/nova")
    NYLAS_MUTEX = ConcurrentRateLimiter(backend, "nylas-grant-123", limit=4)

    @dramatiq.actor
    def sync_thread(...):
        with NYLAS_MUTEX.acquire():    # raises RateLimitExceeded when 4 are already running
            ...

Each operation is one call of a SQL function from ``brokers/sql/050_rate_limits.sql`` that holds transaction-level
advisory locks on its keys, so the read-check-write is atomic and never waits on more than the keys it touches.

A ``RateLimitExceeded`` raised by an actor is not a failure: :class:`RateLimitRetries` (a drop-in replacement for
Dramatiq's ``Retries`` middleware, see :func:`use_rate_limit_retries`) re-enqueues such a message after a short,
growing, jittered delay without counting it against ``max_retries``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any, LiteralString

import dramatiq
from dramatiq.common import compute_backoff
from dramatiq.errors import RateLimitExceeded
from dramatiq.middleware import Retries
from dramatiq.rate_limits import RateLimiterBackend
from loguru import logger
from psycopg_pool import ConnectionPool

from . import queries
from .database import Database, fetch_scalar

__all__ = ["PostgresBackend", "RateLimitRetries", "RetryAfter", "use_rate_limit_retries"]

log = logger.bind(component="RateLimits")

#: Connections in the pool a :class:`PostgresBackend` creates from a conninfo (one per worker thread is plenty).
DEFAULT_MAX_POOL_SIZE = 8
#: How often, in milliseconds, a backend deletes expired rows (opportunistically, during a normal call).
DEFAULT_SWEEP_INTERVAL_MS = 60_000
#: Most expired rows one sweep deletes, so a sweep stays a short statement.
DEFAULT_SWEEP_LIMIT = 5_000
#: Longest pause, in milliseconds, between two checks of an event in :meth:`PostgresBackend.wait`; a safety net in
#: case a notification is missed, e.g. after a reconnect.
DEFAULT_WAIT_RECHECK_MS = 1_000
#: First delay, in milliseconds, before a rate-limited message is tried again (doubled, with jitter, each time).
DEFAULT_RATE_LIMIT_MIN_BACKOFF_MS = 1_000
#: Longest delay, in milliseconds, before a rate-limited message is tried again.
DEFAULT_RATE_LIMIT_MAX_BACKOFF_MS = 60_000
#: The LISTEN/NOTIFY channel that wait_notify() publishes on (the payload is the key).
NOTIFY_CHANNEL = "pgmq_broker_rate_limits"


class PostgresBackend(RateLimiterBackend):
    """A rate limiter backend whose counters live in ``pgmq_broker.rate_limits``.

    Use it wherever Dramatiq's docs use ``RedisBackend``. TTLs are in milliseconds, as in Dramatiq, and are measured
    with the database clock, so machines with skewed clocks agree.

    Parameters:
      database: A :class:`~brokers.Database` to share with the broker (you own it): one pool for both.
      pool: Or a pool you own (opened, and closed by you). Each call borrows one connection for one statement.
      conninfo: Otherwise, a connection string: the backend then opens its own small autocommit pool on first use,
        re-creates it after a ``fork()`` (a pool is never shared between processes) and closes it in :meth:`close`.
      max_pool_size: Size of that own pool.
      prepare_statements: Let psycopg prepare the hot statements on that own pool (its default). Turn it off behind
        a transaction-mode pooler (PgBouncer ``pool_mode = transaction``), as for ``PGMQBroker``: its connections
        then run with ``prepare_threshold=None``. A pool passed in is configured by its owner. (:meth:`wait` needs
        LISTEN, which such a pooler does not carry either.)
      sweep_interval_ms: How often expired rows are deleted.

    Raises:
      ValueError: When not exactly one of ``database``, ``pool`` and ``conninfo`` is given.
    """

    def __init__(
        self,
        *,
        database: Database | None = None,
        pool: ConnectionPool[Any] | None = None,
        conninfo: str | None = None,
        max_pool_size: int = DEFAULT_MAX_POOL_SIZE,
        prepare_statements: bool = True,
        sweep_interval_ms: int = DEFAULT_SWEEP_INTERVAL_MS,
    ) -> None:
        if sum(given is not None for given in (database, pool, conninfo)) != 1:
            msg = (
                "PostgresBackend needs exactly one of pool= (a psycopg_pool.ConnectionPool you own) "
                "or conninfo= (a connection string) or database= (a brokers.Database you own); "
                f"got pool={pool!r}, database={database!r}, conninfo given: {conninfo is not None}"
            )
            raise ValueError(msg)
        self._owns_database = database is None
        #: Where the counters are (this process's pool).
        self.database = database or Database(
            conninfo, pool=pool, name="rate-limits", max_size=max_pool_size, prepare_statements=prepare_statements
        )
        self._sweep_interval_s = sweep_interval_ms / 1000
        self._next_sweep_at = time.monotonic() + self._sweep_interval_s

    # Dramatiq's interface (untyped upstream); the semantics are those of its Redis and stub backends.

    def add(self, key: str, value: int, ttl: int) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` ms iff it has no live value. True when set."""
        return self._call(queries.RATE_LIMIT_ADD, {"key": key, "value": value, "ttl": ttl})

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` (absent counts as 0) unless that passes ``maximum``. True when incremented."""
        return self._call(queries.RATE_LIMIT_INCR, {"key": key, "amount": amount, "maximum": maximum, "ttl": ttl})

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        """Subtract ``amount`` from ``key`` unless that goes below ``minimum``. True when decremented."""
        return self._call(queries.RATE_LIMIT_DECR, {"key": key, "amount": amount, "minimum": minimum, "ttl": ttl})

    def incr_and_sum(
        self, key: str, keys: Callable[[], Iterable[str]] | Iterable[str], amount: int, maximum: int, ttl: int
    ) -> bool:
        """Add ``amount`` to ``key`` unless ``amount`` plus the live values of ``keys`` passes ``maximum``.

        ``keys`` is a callable returning the keys (Dramatiq 2.x) or, for older callers, the keys themselves.
        """
        key_list = list(keys() if callable(keys) else keys)
        params = {"key": key, "keys": key_list, "amount": amount, "maximum": maximum, "ttl": ttl}
        return self._call(queries.RATE_LIMIT_INCR_AND_SUM, params)

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block until an event is published on ``key`` or ``timeout`` ms pass (``None``: forever).

        True when the event exists; it stays visible for the ttl given to :meth:`wait_notify`, as with Redis.
        Holds one pool connection for the duration of the wait.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        with self.database.connection() as conn:
            was_autocommit = conn.autocommit
            conn.autocommit = True
            try:
                # LISTEN before the first check, so an event published in between still wakes us.
                conn.execute(queries.RATE_LIMIT_LISTEN)
                while True:
                    if fetch_scalar(conn, queries.RATE_LIMIT_EVENT_EXISTS, {"key": key}):
                        return True
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    recheck_s = DEFAULT_WAIT_RECHECK_MS / 1000
                    pause = recheck_s if remaining is None else min(remaining, recheck_s)
                    for notify in conn.notifies(timeout=pause):
                        if notify.payload == key:
                            break
            finally:
                if not conn.closed:
                    conn.execute(queries.RATE_LIMIT_UNLISTEN)
                    conn.autocommit = was_autocommit

    def wait_notify(self, key: str, ttl: int) -> None:
        """Publish an event on ``key`` that lasts ``ttl`` ms and wake every :meth:`wait` on it."""
        with self.database.connection() as conn:
            conn.execute(queries.RATE_LIMIT_NOTIFY, {"key": key, "ttl": ttl})

    def sweep(self, *, limit: int = DEFAULT_SWEEP_LIMIT) -> int:
        """Delete up to ``limit`` expired rows and return how many. Runs by itself every ``sweep_interval_ms``."""
        with self.database.connection() as conn:
            return int(fetch_scalar(conn, queries.RATE_LIMIT_SWEEP, {"limit": limit}))

    def close(self) -> None:
        """Close the pool this backend opened from a conninfo (a pool or database passed in is left to its owner)."""
        if self._owns_database:
            self.database.close()

    def _call(self, query: LiteralString, params: dict[str, Any]) -> bool:
        with self.database.connection() as conn:
            result = bool(fetch_scalar(conn, query, params))
        self._maybe_sweep()
        return result

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep_at:
            return
        self._next_sweep_at = now + self._sweep_interval_s
        deleted = self.sweep()
        if deleted:
            log.debug("Deleted {} expired rate-limit rows", deleted)


class RetryAfter(RateLimitExceeded):
    """Raise it from an actor to re-run the message after `retry_after_ms` without using a retry.

    For a rate limit someone else told you about (an HTTP 429 with ``Retry-After``). It is a
    ``RateLimitExceeded``, so Dramatiq's worker logs it at debug instead of as an unhandled error, and
    :class:`RateLimitRetries` re-enqueues the message after exactly that delay.
    """

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]
        self.retry_after_ms = retry_after_ms


class RateLimitRetries(Retries):
    """Dramatiq's ``Retries``, except that ``RateLimitExceeded`` re-enqueues the message without using a retry.

    A rate-limited message has not failed: it was simply too early. Dramatiq's ``Retries`` counts it like any
    error (so a busy limiter can exhaust ``max_retries`` and drop good work) and waits ``min_backoff`` (15 s by
    default). This middleware instead re-enqueues it after ``rate_limit_min_backoff_ms`` doubled on each
    consecutive rate-limit, with jitter, up to ``rate_limit_max_backoff_ms``; ``message.options["retries"]`` is left
    alone and ``message.options["rate_limited"]`` counts the deferrals. Every other exception is handled by
    ``Retries`` unchanged. Bound the total time with ``AgeLimit``/``max_age`` if needed.

    An exception from outside Dramatiq counts as a rate limit too when it carries an integer ``retry_after_ms``
    attribute (an HTTP 429 with ``Retry-After``, say): the message is then re-enqueued after exactly that delay
    (with up to 10 % jitter, so deferred jobs do not return as one burst), again without using a retry.

    It must replace ``Retries`` (not sit beside it), e.g. with :func:`use_rate_limit_retries`. Both backoffs are
    also actor options.
    """

    def __init__(
        self,
        *,
        rate_limit_min_backoff_ms: int = DEFAULT_RATE_LIMIT_MIN_BACKOFF_MS,
        rate_limit_max_backoff_ms: int = DEFAULT_RATE_LIMIT_MAX_BACKOFF_MS,
        **retries_options: Any,
    ) -> None:
        super().__init__(**retries_options)
        self.rate_limit_min_backoff_ms = rate_limit_min_backoff_ms
        self.rate_limit_max_backoff_ms = rate_limit_max_backoff_ms

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"rate_limit_min_backoff_ms", "rate_limit_max_backoff_ms"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Defer a rate-limited message; hand everything else to ``Retries``."""
        retry_after_ms = getattr(exception, "retry_after_ms", None)
        told = isinstance(retry_after_ms, int) and not isinstance(retry_after_ms, bool) and retry_after_ms >= 0
        if not told and not isinstance(exception, RateLimitExceeded):
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return
        actor = broker.get_actor(message.actor_name)
        deferrals = int(message.options.get("rate_limited", 0))
        if told:
            delay = int(retry_after_ms * (1 + random.random() / 10))  # type: ignore[operator]
        else:
            min_backoff = actor.options.get("rate_limit_min_backoff_ms", self.rate_limit_min_backoff_ms)
            max_backoff = actor.options.get("rate_limit_max_backoff_ms", self.rate_limit_max_backoff_ms)
            _, delay = compute_backoff(deferrals, factor=min_backoff, max_backoff=max_backoff)
        message.options["rate_limited"] = deferrals + 1
        log.bind(event="rate_limited").info(
            "Message {} hit a rate limit ({}); trying again in {} ms",
            message.message_id,
            exception,
            delay,
        )
        broker.enqueue(message, delay=delay)


def use_rate_limit_retries(broker: dramatiq.Broker, middleware: RateLimitRetries | None = None) -> RateLimitRetries:
    """Put a :class:`RateLimitRetries` in place of the broker's ``Retries`` (same position) and return it.

    Call it right after creating the broker and before declaring actors, like ``broker.add_middleware``. Without a
    ``middleware`` argument the new one copies the old ``Retries`` settings.
    """
    for index, existing in enumerate(broker.middleware):
        if isinstance(existing, Retries):
            if middleware is None:
                middleware = RateLimitRetries(
                    max_retries=existing.max_retries,
                    min_backoff=existing.min_backoff,
                    max_backoff=existing.max_backoff,
                    retry_when=existing.retry_when,
                )
            broker.middleware[index] = middleware
            break
    else:
        middleware = middleware or RateLimitRetries()
        broker.middleware.append(middleware)
    broker.actor_options |= middleware.actor_options
    return middleware
