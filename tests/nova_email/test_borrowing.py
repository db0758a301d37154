"""BorrowingConnection: many threads share a pool smaller than their number, each statement or transaction on one
borrowed connection, with results readable after the connection went back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import attrs
import psycopg
import pytest
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from nova_email.borrowing import BorrowingConnection


@attrs.frozen
class Pair:
    a: int
    b: str


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(db_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True, timeout=10) as p:
        yield p


def test_rows_stay_readable_after_the_connection_went_back(pool: ConnectionPool[Any]) -> None:
    conn = BorrowingConnection(pool)

    cursor = conn.execute("select g from generate_series(1, 3) g")
    other = BorrowingConnection(pool).execute("select 42").fetchone()  # the one connection, used in between

    assert [row[0] for row in cursor.fetchall()] == [1, 2, 3]
    assert other == (42,)
    assert pool.get_stats()["pool_available"] == 1


def test_a_transaction_runs_on_one_connection_and_rolls_back_as_one(pool: ConnectionPool[Any]) -> None:
    conn = BorrowingConnection(pool)
    conn.execute("create temp table if not exists t (n int)")

    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("insert into t values (1)")
        pids = {conn.execute("select pg_backend_pid()").fetchone(), conn.execute("select pg_backend_pid()").fetchone()}
        raise RuntimeError

    assert len(pids) == 1
    assert conn.execute("select count(*) from t").fetchone() == (0,)


def test_a_cursor_block_keeps_its_row_factory(pool: ConnectionPool[Any]) -> None:
    with BorrowingConnection(pool).cursor(row_factory=class_row(Pair)) as cur:
        rows = cur.execute("select 1 as a, 'x' as b").fetchall()

    assert rows == [Pair(1, "x")]


def test_eight_threads_share_one_connection(pool: ConnectionPool[Any]) -> None:
    errors: list[BaseException] = []
    done: list[int] = []

    def job(n: int) -> None:
        try:
            conn = BorrowingConnection(pool)
            for _ in range(20):
                with conn.transaction():
                    conn.execute("select pg_sleep(0.001)")
                assert conn.execute("select %s::int", [n]).fetchone() == (n,)
            done.append(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert sorted(done) == list(range(8))
    assert pool.get_stats().get("connections_num", 1) <= 1


def test_a_statement_error_gives_the_connection_back_usable(pool: ConnectionPool[Any]) -> None:
    conn = BorrowingConnection(pool)

    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("select 1 / 0")

    assert conn.execute("select 1").fetchone() == (1,)
