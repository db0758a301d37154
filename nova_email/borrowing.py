"""A connection that holds a pooled connection only while a statement or a transaction runs.

A job spends most of its time waiting for Nylas. Holding a pooled connection for the whole job, as each worker thread
did, needs one connection per thread; borrowing one per statement (or per transaction, or per cursor block) lets a
handful of connections serve every thread of a worker process, so the process fits the connection budget whatever
``--threads`` says. Processors see the usual ``execute``/``transaction``/``cursor`` and change nothing.

Results need no connection once a statement has run: psycopg's client-side cursors hold the whole result, so
``conn.execute(...).fetchone()`` works after the connection went back to the pool. Statements inside
``with conn.transaction():`` (or a ``with conn.cursor():`` block) all run on the one connection borrowed for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

__all__ = ["BorrowingConnection"]


class BorrowingConnection:
    """The part of ``psycopg.Connection`` the processors use, borrowing from `pool` one unit of work at a time.

    One per job and thread (like the connection it replaces); the pool's connections must be in autocommit mode.
    """

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool
        self._held: psycopg.Connection[Any] | None = None

    @contextmanager
    def _borrowed(self) -> Iterator[psycopg.Connection[Any]]:
        if self._held is not None:
            yield self._held
            return
        with self._pool.connection() as conn:
            self._held = conn
            try:
                yield conn
            finally:
                self._held = None

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        """Run one statement on a borrowed connection (the held one inside a transaction); its rows stay readable."""
        with self._borrowed() as conn:
            return conn.execute(query, params, **kwargs)

    @contextmanager
    def transaction(self, **kwargs: Any) -> Iterator[psycopg.Transaction]:
        """A transaction on one borrowed connection, given back after commit or rollback (nested: a savepoint)."""
        with self._borrowed() as conn, conn.transaction(**kwargs) as tx:
            yield tx

    @contextmanager
    def cursor(self, **kwargs: Any) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on one borrowed connection, for the ``with`` block."""
        with self._borrowed() as conn, conn.cursor(**kwargs) as cur:
            yield cur
