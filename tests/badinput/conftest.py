"""One simulator and one running worker command for the whole bad-input module: hypothesis feeds them batches."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg
import pytest

from nova_email.simulator.server import SimulatorHandle, start_in_thread
from tests.chaos.scenario import worker_env
from tests.processes import Workers, running_workers

GRANT = "grant-bad-input"


@attrs.frozen(kw_only=True)
class Target:
    """What the bad input is thrown at: a simulator, an inbox of its grant, and the running workers."""

    nylas: SimulatorHandle
    workers: Workers
    inbox_id: uuid.UUID
    thread_ids: list[str]
    message_ids: list[str]


@pytest.fixture(scope="module")
def target(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    nylas = start_in_thread(seed=61, grants=[GRANT], threads_per_grant=10, large_body_share=0.0)
    log_path: Path = tmp_path_factory.mktemp("badinput") / "workers.log"
    try:
        env = worker_env(db_url, nylas, POLL_INTERVAL_MS="100")
        with running_workers(env, log_path, processes=1, threads=4) as workers:
            export = nylas.export(GRANT)
            yield Target(
                nylas=nylas,
                workers=workers,
                inbox_id=uuid.uuid4(),
                thread_ids=[t["id"] for t in export["threads"]],
                message_ids=[m["id"] for m in export["messages"]],
            )
    finally:
        nylas.stop()


@pytest.fixture
def inbox(target: Target, conn: psycopg.Connection) -> uuid.UUID:
    """The grant's inbox, created anew for each test (tables are emptied after every test)."""
    conn.execute(
        "insert into flux_inboxes (id, nylas_grant_id) values (%s, %s) on conflict do nothing",
        [target.inbox_id, GRANT],
    )
    return target.inbox_id
