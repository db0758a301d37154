"""One database as a process reaches it: a pool opened on first use in each process, and outages logged once.

:class:`Database` is what the broker, its lease keeper, the periodic scheduler and the rate-limit backend share, and
what the service builds its own pool from: hand one instance to each of them and a worker process holds one pool.
A pool never crosses a ``fork()``: a process that inherits an opened pool leaves it to its parent and opens its own
(:class:`PerProcess`). A connection failure becomes :class:`~brokers.DatabaseUnavailable`; the first one of an
outage is logged at warning, the first success after it at info, and nothing in between (:class:`Outage`). A pool
whose connections are all in use for longer than its timeout is not an outage: that is :class:`~brokers.DatabaseBusy`,
and the pool never opens more than its ``max_size`` to avoid it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, LiteralString, TypeVar

import psycopg
from loguru import logger
from psycopg.abc import QueryNoTemplate
from psycopg.rows import RowFactory, scalar_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import DatabaseBusy, DatabaseUnavailable

__all__ = ["Backoff", "Database", "Outage", "PerProcess", "fetch_scalar"]

log = logger.bind(component="Database")

#: Connections per process in a pool the :class:`Database` opens.
DEFAULT_POOL_MAX_SIZE = 16
#: Seconds to wait for a pooled connection (all busy) before raising :class:`~brokers.DatabaseBusy`.
DEFAULT_POOL_TIMEOUT_S = 5.0

T = TypeVar("T")


class PerProcess(Generic[T]):
    """A value made on first use in each process (a pool, an HTTP session): never shared across ``fork()``.

    Parameters:
        factory: Makes the value; called at most once per process, under a lock.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> T:
        """This process's value, made now if this process has none yet."""
        value = self._value
        if value is not None and self._pid == os.getpid():
            return value
        with self._lock:
            if self._value is None or self._pid != os.getpid():
                # An inherited value belongs to the parent: leave it alone (never close it here) and make our own.
                self._value = self._factory()
                self._pid = os.getpid()
            return self._value

    def made_here(self) -> bool:
        """Whether this process made the value (and may use or close it)."""
        return self._value is not None and self._pid == os.getpid()

    def take(self) -> T | None:
        """Forget the value and return it if this process made it (to close it), else None."""
        with self._lock:
            value, self._value = self._value, None
            return value if self._pid == os.getpid() else None


class Outage:
    """Logs that something is unreachable once when it happens, and once when it is back.

    Parameters:
        component: The ``component`` the two lines are bound to.
        lost: The warning logged at the first failure; ``{}`` is the error.
        recovered: The line logged at the first success after it; ``{:.1f}`` is the outage's length in seconds.
    """

    def __init__(
        self,
        *,
        component: str = "PGMQBroker",
        lost: str = "Lost the database, retrying with backoff: {}",
        recovered: str = "Database reachable again after {:.1f} s",
    ) -> None:
        #: When the outage began (monotonic), or None while reachable.
        self.since: float | None = None
        self._log = logger.bind(component=component)
        self._lost = lost
        self._recovered = recovered
        self._lock = threading.Lock()

    @property
    def ongoing(self) -> bool:
        """Whether an outage is going on (callers then log their own consequences of it at debug)."""
        return self.since is not None

    def lost(self, exc: BaseException) -> None:
        """Record a failure; the first of an outage is logged at warning."""
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                self._log.bind(event="database_lost").warning(self._lost, exc)

    def recovered(self, started_at: float | None = None) -> None:
        """Record a success; the first after an outage is logged at info.

        `started_at` (monotonic) is when the successful call began: a call already under way when the outage began
        may still finish, which proves nothing, so it does not end the outage.
        """
        if self.since is None:
            return
        with self._lock:
            if self.since is not None and (started_at is None or started_at > self.since):
                self._log.bind(event="database_recovered").info(self._recovered, time.monotonic() - self.since)
                self.since = None


class Backoff:
    """A pause that doubles on each failure between two bounds, and resets on success."""

    def __init__(self, *, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        #: The pause after the latest failure (0 before the first).
        self.current_s = 0.0

    def next_s(self) -> float:
        """Record a failure and return how long to pause."""
        self.current_s = min(max(self.current_s * 2, self.min_s), self.max_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


class Database:
    """A database reached through one pool per process, with outages reported as :class:`DatabaseUnavailable`.

    Nothing touches the network in ``__init__``, and nothing resolves the connection string either when it is given
    as a callable. Use :meth:`execute` for one statement, :meth:`connection` for
    several (or a transaction), and :attr:`pool` for code that wants psycopg's own errors.

    Parameters:
        conninfo: A libpq connection string, or a callable that returns one; the pool is opened from it on first use
            in each process. A callable is called then, before the pool reads `max_size` and `prepare_statements`
            (so it may set them): an application can import its broker without reading its configuration. Either
            this or `pool`.
        pool: An existing psycopg ``ConnectionPool`` you own (opened and closed by you); its connections must be
            usable in autocommit mode.
        name: The pool's name (psycopg logs it).
        min_size, max_size, timeout_s: The pool opened from `conninfo`.
        prepare_statements: Let psycopg prepare hot statements. Turn it off behind transaction-mode poolers.
    """

    def __init__(
        self,
        conninfo: str | Callable[[], str] | None = None,
        *,
        pool: ConnectionPool | None = None,
        name: str = "pgmq-broker",
        min_size: int = 1,
        max_size: int = DEFAULT_POOL_MAX_SIZE,
        timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        prepare_statements: bool = True,
    ) -> None:
        if (conninfo is None) == (pool is None):
            msg = "Database needs exactly one of conninfo= (a libpq connection string) or pool= (a ConnectionPool)"
            raise ValueError(msg)
        self._given_pool = pool
        self.conninfo = conninfo
        self.name = name
        self.min_size = min_size
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.prepare_statements = prepare_statements
        self.outage = Outage()
        self._own_pool: PerProcess[ConnectionPool] = PerProcess(self._open_pool)

    def _open_pool(self) -> ConnectionPool:
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        return _CountingPool(
            conninfo or "",
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout_s,
            kwargs=self.connect_kwargs(),
            name=self.name,
            open=True,
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of every pooled connection (autocommit, prepared statements)."""
        return {"autocommit": True, "prepare_threshold": 5 if self.prepare_statements else None}

    @property
    def pool(self) -> ConnectionPool:
        """This process's pool (opened on first use); borrow from it for work next to the broker's."""
        return self._given_pool if self._given_pool is not None else self._own_pool.get()

    def dsn_and_kwargs(self) -> tuple[str, Mapping[str, Any]]:
        """What a dedicated connection (a LISTEN one) needs to reach the pool's database."""
        pool = self.pool
        # psycopg_pool also accepts callables for both (credentials that rotate).
        conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
        kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
        return conninfo, kwargs or {}

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; connection failures become :class:`DatabaseUnavailable`."""
        pool = self.pool
        started_at = time.monotonic()
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise self._timed_out(exc, pool) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(exc, pool) from exc
        self.outage.recovered(started_at)

    def execute(
        self,
        query: LiteralString | bytes,
        params: Mapping[str, Any] | None = None,
        *,
        row_factory: RowFactory[Any] | None = None,
    ) -> list[Any]:
        """Run one statement on a pooled connection and return its rows: the hot path, without context managers.

        Rows are tuples, or what `row_factory` makes of them (``class_row(Model)``).

        Raises:
            DatabaseUnavailable: The database could not be reached, or the connection broke.
            DatabaseBusy: Every pooled connection stayed in use for `timeout_s`.
        """
        pool = self.pool
        started_at = time.monotonic()
        try:
            conn = pool.getconn()
            try:
                cursor = conn.execute(query, params) if row_factory is None else conn.cursor(row_factory=row_factory)
                if row_factory is not None:
                    cursor.execute(query, params)
                rows = cursor.fetchall() if cursor.description is not None else []
            finally:
                pool.putconn(conn)
        except PoolTimeout as exc:
            raise self._timed_out(exc, pool) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self._unavailable(exc, pool) from exc
        self.outage.recovered(started_at)
        return rows

    def _unavailable(self, exc: BaseException, pool: ConnectionPool) -> DatabaseUnavailable:
        self.outage.lost(exc)
        try:
            # Replace the connections that died with the server now, not one failed call at a time.
            pool.check()
        except Exception:
            log.opt(exception=True).debug("Pool check failed during an outage")
        msg = f"The database is unavailable ({type(exc).__name__}: {exc}); retrying with backoff"
        return DatabaseUnavailable(msg)

    def _timed_out(self, exc: PoolTimeout, pool: ConnectionPool) -> DatabaseUnavailable:
        # A wait also times out when the pool cannot open connections: the server is down, or a connection attempt
        # hangs (a frozen server) without failing. Only a pool whose every connection is in use is busy.
        if self.outage.ongoing or _connections_in_use(pool) < pool.max_size:
            return self._unavailable(exc, pool)
        return self._busy(pool)

    def _busy(self, pool: ConnectionPool) -> DatabaseBusy:
        # Not an outage: the server may answer well, this process is using all its connections. No outage is logged
        # and the pool is left as it is: the caller retries the job or the fetch.
        msg = (
            f"All {pool.max_size} connections of pool {pool.name!r} stayed in use for {pool.timeout:g} s; "
            "retry later, or give the pool more connections if this persists"
        )
        return DatabaseBusy(msg, max_size=pool.max_size, timeout_s=pool.timeout)

    def opened_here(self) -> bool:
        """Whether this process opened its own pool already (a given pool counts as opened)."""
        return self._given_pool is not None or self._own_pool.made_here()

    def close(self) -> None:
        """Close the pool this object opened in this process (a pool passed in is left to its owner)."""
        pool = self._own_pool.take()
        if pool is not None:
            pool.close()


def fetch_scalar(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Mapping[str, Any] | None = None) -> Any:
    """Run `query` on `conn` and return the first column of its first row (None without a row, or for a null)."""
    with conn.cursor(row_factory=scalar_row) as cursor:
        return cursor.execute(query, params).fetchone()


class _CountingPool(ConnectionPool):
    """A pool that counts the connections it has handed out and not taken back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.in_use = 0
        self._in_use_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        conn = super().getconn(timeout)
        with self._in_use_lock:
            self.in_use += 1
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        with self._in_use_lock:
            self.in_use -= 1
        super().putconn(conn)


def _connections_in_use(pool: ConnectionPool) -> int:
    """How many of `pool`'s connections callers hold now."""
    if isinstance(pool, _CountingPool):
        return pool.in_use
    # A pool passed in: its size counts connections still being opened too, so a hanging attempt looks in use.
    stats = pool.get_stats()
    return stats.get("pool_size", 0) - stats.get("pool_available", 0)
