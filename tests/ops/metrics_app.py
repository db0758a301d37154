"""A worker app for the metrics test: the PGMQ broker with `add_metrics`, one actor that works, one that fails.

Run as ``dramatiq tests.ops.metrics_app`` with DATABASE_URL and METRICS_PORT set.
"""

from __future__ import annotations

import dramatiq

from brokers import PGMQBroker
from nova_email.config import load_settings
from nova_email.ops.metrics import add_metrics

QUEUE = "ops_metrics_test"

settings = load_settings(env_file=None)
assert settings.database_url is not None
broker = PGMQBroker(url=settings.database_url, poll_interval_ms=100)
assert add_metrics(broker, settings)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE)
def tick(n: int) -> int:
    return n


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def explode() -> None:
    msg = "exploded on purpose"
    raise RuntimeError(msg)
