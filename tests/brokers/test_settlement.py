"""The settlement's commands against a real queue: starts counted once each, stale deliveries left alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.middleware import Middleware

from brokers import PGMQBroker
from brokers.consumer import PGMQMessageProxy

from .conftest import wait_until, warnings_of


def fetch_all(broker: PGMQBroker, queue_name: str, count: int) -> list[PGMQMessageProxy]:
    @dramatiq.actor(queue_name=queue_name, broker=broker)
    def job(n: int) -> None: ...

    broker.enqueue_many([job.message(n) for n in range(count)])
    consumer = broker.consume(queue_name, prefetch=count, timeout=100)
    proxies = [next(consumer) for _ in range(count)]
    assert all(isinstance(proxy, PGMQMessageProxy) for proxy in proxies)
    return proxies  # type: ignore[return-value]


@pytest.fixture
def stale_warnings() -> Iterator[list[str]]:
    """The stale-settlement warnings logged during the test."""
    with warnings_of("stale_settlement") as lines:
        yield lines


def test_a_stale_requeue_and_keep_are_logged_once_with_their_message_id(
    broker: PGMQBroker, conn: psycopg.Connection, stale_warnings: list[str]
) -> None:
    # Given three fetched deliveries, two of which another worker took since
    proxies = fetch_all(broker, "stale_release", 3)
    taken = [proxies[0], proxies[1]]
    conn.execute(
        "update pgmq.q_stale_release set last_read_at = clock_timestamp() where msg_id = any(%s)",
        [[proxy.lease.msg_id for proxy in taken]],
    )

    # When one is requeued with the held one, and the other is kept
    proxies[0].consumer.requeue([proxies[0], proxies[2]])
    broker.settlement.keep(proxies[1].lease)

    # Then each stale one is logged once, by message id, and the held one is not
    assert len(stale_warnings) == 2
    assert [sum(proxy.message_id in line for line in stale_warnings) for proxy in proxies] == [1, 1, 0]


class EnqueueHooks(Middleware):
    def __init__(self) -> None:
        self.after: list[str] = []

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        self.after.append(message.message_id)


def test_a_stale_retry_is_not_reported_as_enqueued(
    broker: PGMQBroker, conn: psycopg.Connection, stale_warnings: list[str]
) -> None:
    # Given a fetched delivery that another worker took since
    hooks = EnqueueHooks()
    broker.add_middleware(hooks)
    [proxy] = fetch_all(broker, "stale_retry", 1)
    hooks.after.clear()
    conn.execute("update pgmq.q_stale_retry set last_read_at = clock_timestamp()")

    # When its retry is enqueued (what Retries does)
    broker.enqueue(proxy)

    # Then nothing was sent, and no middleware hears that it was
    assert conn.execute("select count(*) from pgmq.q_stale_retry").fetchone() == (1,)
    assert hooks.after == []
    assert len(stale_warnings) == 1


def test_worker_threads_starting_together_count_each_delivery_once(
    broker: PGMQBroker, conn: psycopg.Connection
) -> None:
    # Given 16 fetched deliveries, one of which another worker took since (its token changed)
    proxies = fetch_all(broker, "starting", 16)
    taken = proxies[5].lease.msg_id
    conn.execute("update pgmq.q_starting set last_read_at = clock_timestamp() where msg_id = %s", [taken])

    # When 16 worker threads start them at the same moment
    barrier = threading.Barrier(16)

    def start(proxy: PGMQMessageProxy) -> bool:
        barrier.wait()
        return broker.settlement.start(proxy.lease)

    with ThreadPoolExecutor(16) as threads:
        started = list(threads.map(start, proxies))

    # Then each held delivery was counted once, and the one taken elsewhere was not started or counted
    assert started == [proxy.lease.msg_id != taken for proxy in proxies]
    counts = dict(conn.execute("select msg_id, read_ct from pgmq.q_starting").fetchall())
    assert counts == {proxy.lease.msg_id: 0 if proxy.lease.msg_id == taken else 1 for proxy in proxies}
    assert all(proxy.lease.read_ct == 1 for proxy in proxies if proxy.lease.msg_id != taken)


def test_a_stale_start_is_logged_once(
    broker: PGMQBroker,
    make_worker: Any,
    conn: psycopg.Connection,
    stale_warnings: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a worker with one thread, busy with one message while the next one waits in its buffer
    busy = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    @dramatiq.actor(queue_name="stale_start", broker=broker)
    def job(n: int) -> None:
        ran.append(n)
        if n == 1:
            busy.set()
            release.wait(10)

    first = job.send(1)
    second = job.send(2)
    make_worker(broker, threads=1)
    assert busy.wait(10)

    # When another worker takes the buffered message meanwhile (its token changes), and the busy one finishes
    conn.execute(
        "update pgmq.q_stale_start set last_read_at = clock_timestamp() where message->>'message_id' = %s",
        [second.message_id],
    )
    release.set()

    # Then the buffered message is not run, and that is said once, with its message id
    wait_until(lambda: len(stale_warnings) == 1, what="the stale start's warning")
    assert ran == [1]
    assert second.message_id in stale_warnings[0] and first.message_id not in stale_warnings[0]
    assert "was skipped" not in caplog.text
