"""The settlement's commands against a real queue: stale deliveries left alone, leases only for free threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.middleware import Middleware

from brokers import PGMQBroker
from brokers.consumer import PGMQMessageProxy
from brokers.slots import Slots

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


#: Leases of a queue right now: rows hidden by a fetch.
LEASED = "select count(*) from pgmq.{table} where last_read_at is not null and vt > clock_timestamp()"


def leased(conn: psycopg.Connection, queue_name: str) -> int:
    row = conn.execute(LEASED.format(table=f"q_{queue_name}")).fetchone()  # the names are the tests' literals
    return int(row[0]) if row else 0


def test_a_worker_leases_no_more_messages_than_it_has_threads_across_its_queues(
    broker: PGMQBroker, make_worker: Any, conn: psycopg.Connection
) -> None:
    # Given two queues of 10 messages each, whose jobs wait until the test lets them finish
    release = threading.Event()
    running: list[str] = []

    @dramatiq.actor(queue_name="slots_a", broker=broker)
    def job_a(n: int) -> None:
        running.append(f"a{n}")
        release.wait(10)

    @dramatiq.actor(queue_name="slots_b", broker=broker)
    def job_b(n: int) -> None:
        running.append(f"b{n}")
        release.wait(10)

    broker.enqueue_many([job_a.message(n) for n in range(10)] + [job_b.message(n) for n in range(10)])

    # When a worker of 3 threads runs (its consumers would prefetch 6 messages each)
    worker = make_worker(broker, threads=3)
    wait_until(lambda: len(running) == 3, what="three jobs running")

    # Then exactly the three running messages are leased (and counted), none waits in a buffer
    assert leased(conn, "slots_a") + leased(conn, "slots_b") == 3
    counted = conn.execute(
        "select count(*) from (select read_ct from pgmq.q_slots_a union all select read_ct from pgmq.q_slots_b) r"
        " where read_ct > 0"
    ).fetchone()
    assert counted == (3,)

    # And once they finish, every message runs, and no slot is lost
    release.set()
    broker.join("slots_a", timeout=10_000)
    broker.join("slots_b", timeout=10_000)
    assert sorted(running) == sorted([f"a{n}" for n in range(10)] + [f"b{n}" for n in range(10)])
    worker.stop(timeout=10_000)
    assert broker.settlement.slots.taken == 0


class Waiter:
    woken = 0

    @property
    def iterating(self) -> bool:
        return True

    def wake(self) -> None:
        self.woken += 1


def test_a_consumer_short_of_slots_is_woken_when_a_message_is_settled() -> None:
    # Given two slots, both running a message
    slots, first, second = Slots(), Waiter(), Waiter()
    slots.add_threads(2)
    assert slots.take(2, first) == 2

    # When another consumer wants one, then a message is settled
    assert slots.take(1, second) == 0
    slots.give_back(1)

    # Then the waiting consumer is woken and gets the free slot, and only that one
    assert (second.woken, first.woken) == (1, 0)
    assert slots.take(5, second) == 1


def test_the_same_message_leased_twice_by_one_consumer_gives_back_both_slots(
    broker: PGMQBroker, conn: psycopg.Connection
) -> None:
    # Given a consumer whose delivery lapsed (another heartbeat never came) and which leased the message again
    @dramatiq.actor(queue_name="twice", broker=broker)
    def job() -> None: ...

    broker.settlement.slots.add_threads(2)
    job.send()
    consumer = broker.consume("twice", prefetch=2, timeout=100)
    first = next(consumer)
    conn.execute("update pgmq.q_twice set vt = clock_timestamp()")
    second = next(consumer)
    assert isinstance(first, PGMQMessageProxy) and isinstance(second, PGMQMessageProxy)
    assert (second.lease.msg_id, broker.settlement.slots.taken) == (first.lease.msg_id, 2)

    # When both deliveries are settled (the stale one changes nothing in the database)
    second.consumer.ack(second)
    first.consumer.ack(first)

    # Then both threads are free again
    assert broker.settlement.slots.taken == 0


def test_a_delayed_message_of_an_idle_queue_runs_while_another_queue_is_busy(
    broker: PGMQBroker, make_worker: Any
) -> None:
    # Given one worker thread busy with a long queue of short jobs
    order: list[str] = []

    @dramatiq.actor(queue_name="busy_queue", broker=broker)
    def busy(n: int) -> None:
        time.sleep(0.01)
        order.append(f"busy{n}")

    @dramatiq.actor(queue_name="idle_queue", broker=broker)
    def later() -> None:
        order.append("later")

    broker.enqueue_many([busy.message(n) for n in range(300)])
    make_worker(broker, threads=1)
    wait_until(lambda: len(order) >= 5, what="the busy queue running")

    # When a message is sent to the idle queue, visible in 0.3 s (no notification says when it becomes visible)
    later.send_with_options(delay=300)

    # Then it runs soon after it is due, long before the busy queue is drained (300 jobs of 10 ms)
    wait_until(lambda: "later" in order, timeout_s=30, what="the delayed message to run")
    assert order.index("later") < 250, f"ran after {order.index('later')} busy jobs"
