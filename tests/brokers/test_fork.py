"""The broker's pool across ``fork()``: a child opens its own and leaves the parent's alone."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from dramatiq import Message
from psycopg_pool import ConnectionPool

from brokers import PGMQBroker


def message(text: str) -> Message[None]:
    return Message(queue_name="forked", actor_name="job", args=(text,), kwargs={}, options={})


def backend_pid(broker: PGMQBroker) -> int:
    with broker.database.connection() as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def use_the_broker_in_a_child(
    broker: PGMQBroker, parent_pool: ConnectionPool[Any], results: multiprocessing.Queue[dict[str, Any]]
) -> None:
    """Runs in the forked child: which pool the broker gives it, on which server process, and a send."""
    pool = broker.pool
    child_backend = backend_pid(broker)
    broker.enqueue(message("from the child"))
    broker.close()  # closes the child's own pool only
    results.put(
        {
            "new_pool": pool is not parent_pool,
            "backend_pid": child_backend,
            "pid": os.getpid(),
        }
    )


def test_a_forked_child_opens_its_own_pool_and_the_parents_keeps_working(
    make_broker: Callable[..., PGMQBroker],
) -> None:
    # Given a broker whose pool is open in this process, on a single connection
    broker = make_broker(pool_min_size=1, pool_max_size=1)
    parent_pool = broker.pool
    parent_backend = backend_pid(broker)

    # When a forked child uses the broker and exits
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    child = context.Process(target=use_the_broker_in_a_child, args=(broker, parent_pool, results))
    child.start()
    report = results.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0

    # Then the child had a pool of its own, on its own server connection, and could send
    assert report["pid"] != os.getpid()
    assert report["new_pool"]
    assert report["backend_pid"] != parent_backend
    # And the parent's pool is the same, on the same connection, which the child neither used nor closed
    assert broker.pool is parent_pool
    assert not parent_pool.closed
    assert backend_pid(broker) == parent_backend
    broker.enqueue(message("from the parent"))
    consumer = broker.consume("forked", prefetch=2, timeout=200)
    received = [next(consumer), next(consumer)]
    assert sorted(m.args[0] for m in received if m is not None) == ["from the child", "from the parent"]
    for received_message in received:
        assert received_message is not None
        consumer.ack(received_message)
    consumer.close()
