"""How the service reaches PostgreSQL: which server, and a connection pool per process.

This is the only module that knows where the database is. DATABASE_URL wins; without it the
embedded server (`nova_email.embedded`) is started on demand and reused. The pool is the broker's
kind of :class:`brokers.Database`, opened lazily in each process, so a forked Dramatiq worker never
shares its parent's sockets; `database` returns it, so the broker and the service can share one pool.
Where the database is, and the pool's size, are resolved when the pool first opens, not when it is built: importing
`nova_email.actors` neither reads the settings nor starts the embedded server.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import psycopg
from loguru import logger
from psycopg_pool import ConnectionPool

from brokers import Database

from .borrowing import BorrowingConnection
from .config import Settings, current_settings
from .embedded import embedded_server_is_default, embedded_server_url
from .errors import ConfigError

__all__ = ["close_pool", "connect", "connection", "database", "database_url", "get_pool", "with_database"]

log = logger.bind(component="Database")


_lock = threading.Lock()
_database: Database | None = None
_announced: set[str] = set()


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` on the same server (for commands that create databases)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def database_url(settings: Settings, *, announce: bool = True) -> str:
    """The URL to use: DATABASE_URL, or in the source checkout the embedded server's (started if needed).

    Logs the choice once (at debug), on the first call that may `announce` it: the worker and the CLI do, the pool
    opened by another application's first send does not (its log is its own).

    Raises:
        ConfigError: DATABASE_URL is not set in an installed package.
    """
    if settings.database_url is not None:
        url, where = settings.database_url, f"DATABASE_URL {settings.database_url_redacted}"
    elif not embedded_server_is_default():
        msg = "DATABASE_URL is not set; set it to postgresql://user:password@host:5432/db"
        raise ConfigError(msg)
    else:
        url = embedded_server_url(settings.data_dir)
        where = f"the embedded PostgreSQL in {settings.data_dir.resolve() / 'pgdata'}"
    if announce and url not in _announced:
        _announced.add(url)
        # DEBUG: a URL (even redacted) in every process's first lines tells a log reader more than they need.
        log.debug("Using {}", where)
    return url


def _prepares_statements(settings: Settings) -> bool:
    """Whether connections may prepare statements, pooled or not.

    Not behind a transaction-mode pooler (DATABASE_TRANSACTION_POOLER): the next statement may run on another
    server session, which never prepared it.
    """
    return not settings.database_transaction_pooler


def connect(settings: Settings, **kwargs: object) -> psycopg.Connection:
    """A single new connection (for commands that need one, such as ``migrate``)."""
    if not _prepares_statements(settings):
        kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(database_url(settings), **kwargs)  # type: ignore[arg-type]


def database(settings: Settings | None = None, *, max_size: int | None = None) -> Database:
    """The service's database: one pool per process, opened on first use (and anew after a fork).

    The first call builds it; nothing is read or reached until a connection is needed, then `settings` (default:
    `current_settings`) name the server and the pool's size, `max_size` (default: DATABASE_POOL_SIZE) when given.
    Hand it to the broker (``PGMQBroker(database=...)``) to make the broker use the same pool.
    """
    global _database
    with _lock:
        if _database is None:
            _database = _lazy_database(settings, max_size)
        return _database


def _lazy_database(settings: Settings | None, max_size: int | None) -> Database:
    def resolve() -> str:
        chosen = settings or current_settings()
        built.max_size = chosen.database_pool_size if max_size is None else max_size
        built.prepare_statements = _prepares_statements(chosen)
        return database_url(chosen, announce=False)

    built = Database(resolve, name="nova_email")
    return built


def get_pool(settings: Settings, *, max_size: int | None = None) -> ConnectionPool:
    """This process's pool, created on first use (and anew after a fork)."""
    return database(settings, max_size=max_size).pool


@contextmanager
def connection(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection for one job: it borrows from this process's pool per statement, transaction or cursor block.

    Use ``conn.transaction()`` for units of work. Between them no pooled connection is held, so a job waiting for
    Nylas holds none, and a small pool serves every worker thread (see `BorrowingConnection`).
    """
    # Typed as the psycopg connection whose execute, transaction and cursor it provides: the processors take one.
    yield cast(psycopg.Connection, BorrowingConnection(get_pool(settings)))


def close_pool() -> None:
    """Close this process's pool (on shutdown)."""
    global _database
    with _lock:
        if _database is not None:
            _database.close()
        _database = None
