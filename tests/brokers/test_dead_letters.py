"""The dead-letter store's housekeeping: purging dead letters by queue and by age."""

from __future__ import annotations

import dramatiq
import psycopg
import pytest

from brokers import PGMQBroker


def dead_letter(broker: PGMQBroker, queue_name: str, count: int) -> None:
    """Send `count` messages to `queue_name` and nack each, as Dramatiq does once a message has failed for good."""

    @dramatiq.actor(queue_name=queue_name, actor_name=f"{queue_name}_job", broker=broker)
    def job(n: int) -> None: ...

    broker.enqueue_many([job.message(n) for n in range(count)])
    consumer = broker.consume(queue_name, prefetch=count, timeout=100)
    for _ in range(count):
        message = next(consumer)
        assert message is not None
        message.fail()
        consumer.nack(message)
    consumer.close()
    assert broker.count_dead_letters(queue_name) == count


def age(conn: psycopg.Connection, queue_name: str, *, seconds: int) -> None:
    """Make every dead letter of `queue_name` `seconds` old."""
    conn.execute(
        "update pgmq_broker.dead_letters set dead_at = now() - %s * interval '1 second' where queue_name = %s",
        [seconds, queue_name],
    )


@pytest.fixture
def letters(broker: PGMQBroker) -> PGMQBroker:
    """A broker whose store holds two dead letters of ``purge_a`` and three of ``purge_b``."""
    dead_letter(broker, "purge_a", 2)
    dead_letter(broker, "purge_b", 3)
    return broker


def test_purging_one_queue_leaves_the_other_queues_dead_letters(letters: PGMQBroker) -> None:
    assert letters.purge_dead_letters("purge_a") == 2
    assert letters.count_dead_letters("purge_a") == 0
    assert letters.count_dead_letters("purge_b") == 3


def test_purging_without_a_queue_deletes_every_dead_letter(letters: PGMQBroker) -> None:
    assert letters.purge_dead_letters() == 5
    assert letters.count_dead_letters() == 0
    assert letters.purge_dead_letters() == 0


def test_purging_older_than_keeps_the_recent_dead_letters(letters: PGMQBroker, conn: psycopg.Connection) -> None:
    # Given dead letters of purge_a from two hours ago and fresh ones of purge_b
    age(conn, "purge_a", seconds=7_200)
    # When those older than an hour are purged, across queues
    assert letters.purge_dead_letters(older_than_s=3_600) == 2
    # Then only the old ones are gone
    assert letters.count_dead_letters("purge_a") == 0
    assert letters.count_dead_letters("purge_b") == 3


def test_purging_one_queue_older_than_needs_both_to_match(letters: PGMQBroker, conn: psycopg.Connection) -> None:
    # Given old dead letters on both queues, and one fresh one on purge_b
    age(conn, "purge_a", seconds=7_200)
    age(conn, "purge_b", seconds=7_200)
    conn.execute(
        "update pgmq_broker.dead_letters set dead_at = now()"
        " where id = (select max(id) from pgmq_broker.dead_letters where queue_name = 'purge_b')"
    )
    # When purge_b's letters older than an hour are purged
    assert letters.purge_dead_letters("purge_b", older_than_s=3_600) == 2
    # Then purge_a's old letters and purge_b's fresh one remain
    assert letters.count_dead_letters("purge_a") == 2
    assert letters.count_dead_letters("purge_b") == 1
    assert letters.purge_dead_letters("purge_b", older_than_s=3_600) == 0
