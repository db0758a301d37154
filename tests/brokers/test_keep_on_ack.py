"""A message marked keep-on-ack is processed but left on its queue, and comes back after its visibility timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dramatiq
import psycopg
from dramatiq import Worker
from dramatiq.middleware import Middleware

from brokers import KEEP_ON_ACK_OPTION, PGMQBroker
from tests.brokers.conftest import wait_until


class _Keep(Middleware):
    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        message.options[KEEP_ON_ACK_OPTION] = True


def test_a_kept_message_runs_again_after_its_visibility_timeout_and_is_never_deleted(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], conn: psycopg.Connection
) -> None:
    # Given a broker with a one-second visibility timeout whose messages are kept on ack
    broker = make_broker(visibility_timeout_s=1)
    broker.add_middleware(_Keep())
    runs: list[float] = []

    @dramatiq.actor(broker=broker, queue_name="kept")
    def dry_run() -> None:
        runs.append(time.monotonic())

    # When one message is sent and processed
    dry_run.send()
    make_worker(broker)
    wait_until(lambda: len(runs) >= 2, timeout_s=15, what="a second delivery")

    # Then it is still on the queue, delivered again only after the visibility timeout
    assert conn.execute("select count(*) from pgmq.q_kept").fetchone() == (1,)
    assert runs[1] - runs[0] >= 0.9


def test_testing_mode_keeps_only_webhook_jobs() -> None:
    from nova_email.worker import TestingMode

    class _Message:
        def __init__(self, queue_name: str) -> None:
            self.queue_name = queue_name
            self.options: dict[str, Any] = {}

    webhook, thread = _Message("nylas_webhook_notifications"), _Message("thread_sync_jobs")
    middleware = TestingMode({"nylas_webhook_notifications"})
    for message in (webhook, thread):
        middleware.before_process_message(dramatiq.get_broker(), message)
    assert webhook.options == {KEEP_ON_ACK_OPTION: True} and thread.options == {}
