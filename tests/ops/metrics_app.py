"""A worker app for the metrics test: the PGMQ broker with `add_metrics`, one actor that works, one that fails,
and one that asks Nylas (a simulator) for a thread.

Run as ``dramatiq tests.ops.metrics_app`` with DATABASE_URL and METRICS_PORT set.
"""

from __future__ import annotations

import dramatiq

from brokers import PGMQBroker
from nova_email.config import load_settings
from nova_email.nylas.client import NylasClient
from nova_email.nylas.errors import NotFound
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


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def fetch_thread(api_uri: str, grant_id: str, thread_id: str) -> None:
    # The default counter, as the service's own client uses: the process's.
    client = NylasClient(api_key="metrics-test", api_uri=api_uri, max_retries=0)
    try:
        client.get_thread(grant_id, thread_id)
    except NotFound:
        pass
    finally:
        client.close()
