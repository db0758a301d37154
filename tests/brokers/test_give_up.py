"""The worker's give-up hook runs only for a message this worker actually dead-lettered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
import psycopg
from dramatiq import Worker

from brokers import PGMQBroker
from nova_email.worker import GiveUpHook

from .conftest import wait_until


def test_a_holder_whose_lease_lapsed_does_not_give_up_on_a_message_it_no_longer_holds(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], db_url: str
) -> None:
    # Given an actor with a give-up hook that fails its only attempt, once after another worker took its message
    broker = make_broker()
    broker.add_middleware(GiveUpHook())
    gave_up: list[Any] = []

    def record(message: Any, exception: BaseException) -> None:
        gave_up.append(message.args[0])

    @dramatiq.actor(queue_name="giving_up", max_retries=0, on_give_up=record, broker=broker)
    def fails(taken_elsewhere: bool) -> None:
        if taken_elsewhere:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    "update pgmq.q_giving_up set last_read_at = clock_timestamp() where message->'args' = '[true]'"
                )
        raise ValueError("last attempt failed")

    fails.send(True)
    fails.send(False)
    make_worker(broker)

    # Then only the message still held is dead-lettered and given up on; the other is left to its new holder
    wait_until(lambda: broker.count_dead_letters("giving_up") == 1, what="a dead letter")
    wait_until(lambda: gave_up == [False], what="the give-up of the held message")
    [letter] = broker.dead_letters("giving_up")
    assert letter.message is not None and letter.message["args"] == [False]
    assert gave_up == [False]
