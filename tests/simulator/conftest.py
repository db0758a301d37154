"""A running simulator per test, reached over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from nova_email.simulator import RecordingEmitter, SimulatorHandle, serve_in_thread

#: Fixed "now" for generated dates (2026-11-01 00:00 UTC), so filters and expectations are reproducible.
ANCHOR = 1_793_491_200
API_KEY = "sim-test-key-0123456789"


@pytest.fixture
def recorder() -> RecordingEmitter:
    return RecordingEmitter()


@pytest.fixture
def sim(recorder: RecordingEmitter) -> Iterator[SimulatorHandle]:
    with serve_in_thread(
        seed=7, grants=["grant-a", "grant-b"], threads_per_grant=60, anchor=ANCHOR, api_key=API_KEY, emitter=recorder
    ) as handle:
        yield handle


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        yield session
