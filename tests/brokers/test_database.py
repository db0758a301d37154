"""The process's pool: a connection string resolved on first use, and a busy pool told apart from an outage."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from brokers import Database, DatabaseBusy, DatabaseUnavailable
from brokers.database import fetch_scalar

from .conftest import warnings_of
from .proxy import TCPProxy


def test_a_conninfo_callable_is_called_on_first_use_and_may_size_the_pool(db_url: str) -> None:
    calls: list[int] = []

    def resolve() -> str:
        calls.append(1)
        database.max_size = 2
        return db_url

    # Given a database built from a callable: nothing is resolved yet
    database = Database(resolve, max_size=7)
    assert calls == []
    try:
        # When it is first used, twice
        assert database.execute("select 1") == [(1,)]
        assert database.execute("select 2") == [(2,)]
        # Then the callable ran once, before the pool read its size
        assert calls == [1]
        assert database.pool.max_size == 2
    finally:
        database.close()


def test_a_pool_whose_connections_are_all_in_use_is_busy_not_an_outage(db_url: str) -> None:
    # Given a pool of one connection, held by a caller
    database = Database(db_url, min_size=1, max_size=1, timeout_s=0.2)
    try:
        with warnings_of("database_lost") as lost, database.connection():
            # When another call waits for a connection past the pool's timeout
            with pytest.raises(DatabaseBusy) as busy:
                database.execute("select 1")
        # Then it is told busy, with the pool it waited on, and no outage was logged or started
        assert busy.value.max_size == 1
        assert busy.value.timeout_s == 0.2
        assert "1 connections" in str(busy.value)
        assert lost == []
        assert not database.outage.ongoing
        # And the pool did not open a second connection to avoid it; the connection works once it is free
        assert database.pool.get_stats()["pool_size"] == 1
        assert database.execute("select 1") == [(1,)]
    finally:
        database.close()


def _outage_warnings_of_calls(database: Database, calls: int) -> list[str]:
    """Make `calls` calls that each raise DatabaseUnavailable (not DatabaseBusy); the outage warnings they logged."""
    with warnings_of("database_lost") as lost:
        for _ in range(calls):
            with pytest.raises(DatabaseUnavailable) as unavailable:
                database.execute("select 1")
            assert not isinstance(unavailable.value, DatabaseBusy)
    return lost


@pytest.mark.parametrize("when", ["before the first connection", "after the first connection"])
def test_a_pool_that_cannot_connect_is_an_outage_not_busy(proxy: TCPProxy, when: str) -> None:
    # Given a database behind a proxy that stops forwarding
    database = Database(proxy.url_through, min_size=1, max_size=1, timeout_s=0.5)
    try:
        if when == "after the first connection":
            assert database.execute("select 1") == [(1,)]
        proxy.stop()
        # When calls wait for a connection the pool cannot open
        lost = _outage_warnings_of_calls(database, 2)
        # Then they are told the database is unavailable, and the outage is logged once
        assert len(lost) == 1
    finally:
        database.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers (a frozen server, a network black hole)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"postgresql://nobody@127.0.0.1:{server.getsockname()[1]}/none?connect_timeout=30"
    finally:
        server.close()


def test_a_pool_whose_connection_attempt_hangs_is_an_outage_not_busy(silent_server: str) -> None:
    # Given a pool of one connection whose only connection attempt never completes
    database = Database(silent_server, min_size=1, max_size=1, timeout_s=0.5)
    try:
        # When calls wait for a connection past the pool's timeout
        lost = _outage_warnings_of_calls(database, 3)
        # Then they are told the database is unavailable (no connection is in use), and the outage is logged once
        assert len(lost) == 1
        assert database.outage.ongoing
    finally:
        database.close()


def test_fetch_scalar_reads_the_first_column_of_the_first_row_and_none_without_one(conn: psycopg.Connection) -> None:
    assert fetch_scalar(conn, "select n, 'other' from generate_series(7, 9) as n order by n") == 7
    assert fetch_scalar(conn, "select %(n)s::int", {"n": 3}) == 3
    assert fetch_scalar(conn, "select 1 where false") is None
