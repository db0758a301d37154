"""Real ``dramatiq tests.brokers.cli_app`` worker processes: the CLI, kill -9, shutdown, competing processes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

import psycopg
import pytest
from dramatiq import Message

from brokers import PGMQBroker

from .conftest import wait_until

pytestmark = pytest.mark.processes

StartCli = Callable[..., "subprocess.Popen[bytes]"]


def message(queue_name: str, actor_name: str, *args: object) -> Message[None]:
    return Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={})


def runs(conn: psycopg.Connection, pattern: str = "%") -> list[str]:
    return [row[0] for row in conn.execute("select key from public.broker_test_runs where key like %s", [pattern])]


def test_the_dramatiq_cli_runs_actors_of_the_named_queues(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given a worker started the way users start it
    start_cli("--queues", "cli_fast", "cli_foreign", "--processes", "1", "--threads", "2")

    # When messages for its queues arrive, from Python and from SQL
    broker.enqueue_many([message("cli_fast", "record", f"k{i}") for i in range(20)])
    conn.execute("select pgmq.create('cli_foreign')")
    conn.execute("""select pgmq.send('cli_foreign', '{"n": 1}'::jsonb)""")

    # Then it runs them all
    wait_until(lambda: len(runs(conn)) == 21, timeout_s=20, what="21 runs")
    assert sorted(runs(conn, "k%")) == sorted(f"k{i}" for i in range(20))
    assert runs(conn, "foreign:%") == ["foreign:1"]


def test_messages_of_a_killed_worker_are_redelivered_and_none_is_lost(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given a worker running three long jobs, with a 2 s visibility timeout
    doomed = start_cli(
        "--queues", "cli_slow", "--processes", "1", "--threads", "3",
        env={"BROKER_TEST_VT_S": "2", "BROKER_TEST_SLEEP_S": "60"},
    )  # fmt: skip
    broker.enqueue_many([message("cli_slow", "record_slowly", f"job{i}") for i in range(3)])
    wait_until(lambda: len(runs(conn, "start:%")) == 3, timeout_s=20, what="three jobs to start")

    # When the worker process is killed outright
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)

    # Then another worker gets the three messages once their leases lapse, and finishes each
    start_cli(
        "--queues", "cli_slow", "--processes", "1", "--threads", "3",
        env={"BROKER_TEST_VT_S": "2", "BROKER_TEST_SLEEP_S": "0.1"},
    )  # fmt: skip
    wait_until(lambda: len(runs(conn, "job%")) == 3, timeout_s=20, what="the three jobs to finish")
    assert sorted(runs(conn, "job%")) == ["job0", "job1", "job2"]
    broker.join("cli_slow", timeout=5_000)


def test_a_stopped_worker_finishes_its_job_and_leaves_the_rest_visible(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given one thread (which leases only the message it runs: none waits in a buffer) and a 30 s visibility timeout
    worker = start_cli(
        "--queues", "cli_slow", "--processes", "1", "--threads", "1",
        env={"BROKER_TEST_VT_S": "30", "BROKER_TEST_SLEEP_S": "1"},
    )  # fmt: skip
    broker.enqueue_many([message("cli_slow", "record_slowly", f"job{i}") for i in range(3)])
    wait_until(lambda: len(runs(conn, "start:%")) == 1, timeout_s=20, what="the first job to start")
    assert broker.metrics("cli_slow").in_flight == 1

    # When it is asked to stop
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=20)

    # Then the running job finished and the others are visible right away, not after 30 s
    assert len(runs(conn, "job%")) == 1
    metrics = broker.metrics("cli_slow")
    assert (metrics.queued, metrics.in_flight) == (2, 0)


@pytest.mark.slow
def test_two_processes_competing_for_10000_messages_run_each_exactly_once(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given 10,000 messages, and two worker processes started on them
    broker.enqueue_many([message("cli_fast", "record", f"m{i}") for i in range(10_000)])
    start_cli("--queues", "cli_fast", "--processes", "2", "--threads", "4")

    # When they have drained the queue
    wait_until(lambda: len(runs(conn)) >= 10_000, timeout_s=120, what="10,000 runs")
    broker.join("cli_fast", timeout=10_000)

    # Then each message ran exactly once, and both processes took part (pid is the worker's os.getpid())
    rows = conn.execute(
        "select count(*), count(distinct key), count(distinct pid) from public.broker_test_runs"
    ).fetchone()
    assert rows is not None
    total, distinct, worker_pids = rows
    assert (total, distinct) == (10_000, 10_000)
    assert worker_pids >= 2
