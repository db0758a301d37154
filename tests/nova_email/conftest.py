"""Fixtures for the processors: a running Nylas simulator, a client pointed at it, an inbox row."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from nova_email.nylas.client import NylasClient
from nova_email.nylas.metrics import ApiCallCounter
from nova_email.simulator.server import SimulatorHandle, start_in_thread

GRANT = "grant-1"


@pytest.fixture
def nylas() -> Iterator[SimulatorHandle]:
    """A simulator with one grant of 40 threads (deterministic), no faults."""
    handle = start_in_thread(seed=11, grants=[GRANT], threads_per_grant=40, large_body_share=0.0)
    yield handle
    handle.stop()


@pytest.fixture
def client(nylas: SimulatorHandle) -> Iterator[NylasClient]:
    nylas_client = NylasClient(api_key="test-key", api_uri=nylas.base_url, max_retries=2, counter=ApiCallCounter())
    yield nylas_client
    nylas_client.close()


@pytest.fixture
def inbox_id(conn: psycopg.Connection) -> uuid.UUID:
    row = conn.execute(
        "insert into flux_inboxes (nylas_grant_id, email, provider) values (%s, %s, 'google') returning id",
        [GRANT, f"{GRANT}@inbox.example"],
    ).fetchone()
    assert row is not None
    return row[0]
