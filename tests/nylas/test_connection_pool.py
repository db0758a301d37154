"""The Nylas client keeps one HTTP connection per concurrent caller it is sized for, and the worker sizes it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from brokers import PGMQBroker
from nova_email.nylas import NylasClient
from nova_email.nylas.client import DEFAULT_POOL_MAXSIZE
from nova_email.simulator import SimulatorHandle, serve_in_thread
from nova_email.worker import nylas_http_connections

GRANT = "grant-pool"


@pytest.fixture
def slow_nylas() -> Iterator[SimulatorHandle]:
    with serve_in_thread(seed=3, grants=[GRANT], threads_per_grant=2, large_body_share=0.0) as handle:
        handle.simulator.faults.latency_ms = 300
        yield handle


def discarded_connections(client: NylasClient, callers: int, caplog: pytest.LogCaptureFixture) -> int:
    """Call Nylas from `callers` threads at once; how many connections the pool closed instead of keeping."""
    start = threading.Barrier(callers)

    def call() -> None:
        start.wait()
        client.list_threads(GRANT, limit=1)

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        threads = [threading.Thread(target=call) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum("Connection pool is full" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("pool_maxsize", [DEFAULT_POOL_MAXSIZE, 32])
def test_a_client_sized_for_its_callers_keeps_every_connection(
    slow_nylas: SimulatorHandle, caplog: pytest.LogCaptureFixture, pool_maxsize: int
) -> None:
    # Given a client sized for a number of concurrent callers
    client = NylasClient(api_key="k", api_uri=slow_nylas.base_url, pool_maxsize=pool_maxsize)
    try:
        # When that many call at once, and then as many more than the default pool
        kept = discarded_connections(client, pool_maxsize, caplog)
        over = discarded_connections(client, pool_maxsize + 8, caplog)
    finally:
        client.close()

    # Then every connection of its callers is kept for the next call; only callers beyond its size open and close one
    assert (kept, over) == (0, 8)


def test_a_worker_process_sizes_the_nylas_pool_from_its_threads(make_broker_for_pool: PGMQBroker) -> None:
    # Given no worker: the default size
    assert nylas_http_connections(make_broker_for_pool) == DEFAULT_POOL_MAXSIZE

    # When a worker of 32 threads boots on the broker
    make_broker_for_pool.settlement.slots.add_threads(32)

    # Then the process's Nylas client keeps a connection for each of them
    assert nylas_http_connections(make_broker_for_pool) == 32


@pytest.fixture
def make_broker_for_pool(db_url: str) -> Iterator[PGMQBroker]:
    broker = PGMQBroker(url=db_url)
    yield broker
    broker.close()
