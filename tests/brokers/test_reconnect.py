"""Database outages, made real with a TCP proxy that drops every connection (as a server restart does)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.errors import ConnectionClosed
from loguru import logger

from brokers import DatabaseUnavailable, PGMQBroker
from brokers.database import Outage

from .conftest import first_delivery, wait_until
from .proxy import TCPProxy


@pytest.fixture
def broker_logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


def test_enqueue_raises_a_connection_error_dramatiq_understands(
    make_broker: Callable[..., PGMQBroker], proxy: TCPProxy
) -> None:
    make_broker(url=proxy.url_through, pool_timeout_s=0.5)  # the global broker the actor below uses

    @dramatiq.actor(queue_name="down")
    def job() -> None:
        pass

    job.send()  # creates the queue while the database is reachable
    proxy.stop()
    with pytest.raises(DatabaseUnavailable) as info:
        job.send()
    assert isinstance(info.value, ConnectionClosed)

    proxy.start()
    wait_until(lambda: _sends(job), timeout_s=10, what="enqueue to work again")


def _sends(actor: dramatiq.Actor[..., None]) -> bool:
    try:
        actor.send()
    except DatabaseUnavailable:
        return False
    return True


@pytest.mark.parametrize("settle", ["ack", "nack"])
def test_ack_and_nack_raise_on_connection_errors_and_succeed_when_retried(
    make_broker: Callable[..., PGMQBroker], proxy: TCPProxy, settle: str
) -> None:
    broker = make_broker(url=proxy.url_through, pool_timeout_s=0.5)

    @dramatiq.actor(queue_name="settle_down")
    def job() -> None:
        pass

    job.send()
    consumer, message = first_delivery(broker, "settle_down")

    # When the database goes away, settling raises the error Dramatiq's worker retries on
    proxy.stop()
    if settle == "nack":
        message.fail()
    with pytest.raises(DatabaseUnavailable):
        getattr(consumer, settle)(message)

    # And once it is back, the same call (as the worker repeats it) settles the message
    proxy.start()
    wait_until(lambda: _settles(consumer, settle, message), timeout_s=10, what="the retried settlement")
    assert broker.metrics("settle_down").queued + broker.metrics("settle_down").in_flight == 0
    assert broker.count_dead_letters("settle_down") == (1 if settle == "nack" else 0)
    consumer.close()


def _settles(consumer: object, settle: str, message: object) -> bool:
    try:
        getattr(consumer, settle)(message)
    except DatabaseUnavailable:
        return False
    return True


def test_a_consumer_rides_out_an_outage_and_deletes_its_acks_once_the_database_is_back(
    make_broker: Callable[..., PGMQBroker], proxy: TCPProxy, broker_logs: list[str]
) -> None:
    # Given a consumer holding the first of two messages, through a connection about to be dropped
    broker = make_broker(url=proxy.url_through, pool_timeout_s=0.5)

    @dramatiq.actor(queue_name="ride_out")
    def job() -> None:
        pass

    job.send()
    job.send()
    consumer, first = first_delivery(broker, "ride_out")

    # When the database goes away as the message is acknowledged (the ack waits for the next fetch), and the
    # worker keeps iterating the consumer
    proxy.stop()
    with pytest.raises(DatabaseUnavailable):
        consumer.ack(first)
    for _ in range(3):
        asked_at = time.monotonic()
        # Then each iteration returns nothing instead of raising, soon enough for the worker to notice a shutdown
        assert next(consumer) is None
        assert time.monotonic() - asked_at < 1.5

    # And once the database is back, the consumer delivers the second message and has deleted the first
    proxy.start()
    second = _next_message(consumer, timeout_s=10)
    assert second.message_id != first.message_id
    metrics = broker.metrics("ride_out")
    assert (metrics.queued, metrics.in_flight) == (0, 1)
    consumer.ack(second)
    consumer.close()
    assert broker.metrics("ride_out").in_flight == 0
    assert sum("Lost the database" in line for line in broker_logs) == 1
    assert sum("Database reachable again" in line for line in broker_logs) == 1


def _next_message(consumer: Consumer, *, timeout_s: float) -> MessageProxy:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError(f"no message within {timeout_s} s")


@pytest.mark.slow
def test_a_database_restart_mid_consume_loses_nothing_and_is_logged_once(
    make_broker: Callable[..., PGMQBroker],
    make_worker: Callable[..., Worker],
    proxy: TCPProxy,
    broker_logs: list[str],
) -> None:
    # Given a worker consuming through a connection that is about to be dropped
    producer = make_broker()
    broker = make_broker(url=proxy.url_through, pool_timeout_s=0.5)
    runs = Counter[int]()
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            runs[n] += 1

    dramatiq.actor(count, queue_name="restart", broker=producer)
    dramatiq.actor(count, queue_name="restart", broker=broker)
    producer.enqueue_many([producer.get_actor("count").message(n) for n in range(50)])
    make_worker(broker)
    wait_until(lambda: len(runs) == 50, what="the first batch")

    # When the database "restarts" (every connection dropped for a second) while messages keep coming
    proxy.stop()
    producer.enqueue_many([producer.get_actor("count").message(n) for n in range(50, 100)])
    time.sleep(1.0)  # the outage itself: nothing to poll for
    proxy.start()

    # Then the worker reconnects and every message runs exactly once
    wait_until(lambda: len(runs) == 100, timeout_s=20, what="the messages sent during the outage")
    producer.join("restart", timeout=10_000)
    assert set(runs.values()) == {1}
    assert sum("Lost the database" in line for line in broker_logs) == 1
    assert sum("Database reachable again" in line for line in broker_logs) == 1
    # The LISTEN connection lost with the others is part of the same outage, not one more
    assert not [line for line in broker_logs if "LISTEN" in line or "Listening again" in line]


@pytest.mark.slow
def test_a_real_database_restart_mid_consume_loses_nothing(
    make_broker: Callable[..., PGMQBroker],
    make_worker: Callable[..., Worker],
    own_server: tuple[str, Callable[[], None]],
    broker_logs: list[str],
) -> None:
    # Given a worker busy with messages on a server of its own
    url, restart = own_server
    producer = make_broker(url=url)
    broker = make_broker(url=url, pool_timeout_s=0.5)
    runs = Counter[int]()
    lock = threading.Lock()

    def slowish(n: int) -> None:
        time.sleep(0.01)
        with lock:
            runs[n] += 1

    dramatiq.actor(slowish, queue_name="restarted", broker=producer)
    dramatiq.actor(slowish, queue_name="restarted", broker=broker)
    producer.enqueue_many([producer.get_actor("slowish").message(n) for n in range(200)])
    make_worker(broker)
    wait_until(lambda: len(runs) >= 20, what="the worker to be busy")

    # When the server restarts under it, and more messages arrive once it is back
    restart()
    wait_until(lambda: _enqueues(producer, 200), timeout_s=20, what="the producer to reconnect")
    producer.enqueue_many([producer.get_actor("slowish").message(n) for n in range(201, 250)])

    # Then every message runs, once, and the outage and the recovery are each logged once per broker (the
    # producer's pooled connection died with the server too)
    wait_until(lambda: len(runs) == 250, timeout_s=30, what="all 250 messages")
    producer.join("restarted", timeout=10_000)
    assert set(runs.values()) == {1}
    assert sum("Lost the database" in line for line in broker_logs) == 2
    assert sum("Database reachable again" in line for line in broker_logs) == 2


def _enqueues(broker: PGMQBroker, n: int) -> bool:
    try:
        broker.enqueue(broker.get_actor("slowish").message(n))
    except DatabaseUnavailable:
        return False
    return True


def test_a_call_already_under_way_when_the_database_went_away_does_not_end_the_outage(
    broker_logs: list[str],
) -> None:
    # Given an outage noticed by one call while another, started before it, is still running
    outage = Outage()
    started_before = time.monotonic()
    outage.lost(ConnectionError("terminating connection due to administrator command"))

    # When that older call succeeds (its backend answered before the server went down), then a newer one does
    outage.recovered(started_before)
    still_down = outage.since is not None
    outage.recovered(time.monotonic())

    # Then only the newer call ends the outage: one line for the loss, one for the recovery
    assert still_down
    assert outage.since is None
    assert [line.split(",")[0].split(" after")[0] for line in broker_logs] == [
        "Lost the database",
        "Database reachable again",
    ]
