"""The settlement's commands against a real queue: starts counted once each, stale deliveries left alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import dramatiq
import psycopg

from brokers import PGMQBroker
from brokers.consumer import PGMQMessageProxy


def fetch_all(broker: PGMQBroker, queue_name: str, count: int) -> list[PGMQMessageProxy]:
    @dramatiq.actor(queue_name=queue_name, broker=broker)
    def job(n: int) -> None: ...

    broker.enqueue_many([job.message(n) for n in range(count)])
    consumer = broker.consume(queue_name, prefetch=count, timeout=100)
    proxies = [next(consumer) for _ in range(count)]
    assert all(isinstance(proxy, PGMQMessageProxy) for proxy in proxies)
    return proxies  # type: ignore[return-value]


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
