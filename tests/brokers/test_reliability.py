"""Real ``dramatiq`` processes frozen (SIGSTOP/SIGCONT) and killed (SIGKILL) while they hold messages.

Three ways good work used to be lost or run too often: a frozen worker that resumes settling the copy another
worker runs now; one undecodable row taking the healthy rows fetched with it down; and a crashing job burning the
delivery count of the messages prefetched with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from dramatiq import Message

from brokers import PGMQBroker

from .conftest import cli_log, wait_until

pytestmark = pytest.mark.processes

StartCli = Callable[..., "subprocess.Popen[bytes]"]

#: Visibility timeout of the workers, in seconds: a frozen holder loses its lease this long after it froze.
VT_S = "1"
#: How long a wait that includes starting a worker command may take: imports are slow on a loaded machine.
STARTUP_S = 90
#: The row worker B's run waits for before it ends (written by the test once worker A has settled and stopped).
SUCCESSOR_GO = "go:successor"


def runs(conn: psycopg.Connection, key: str) -> list[int]:
    """The worker pids of the runs that wrote `key`, in order."""
    return [row[0] for row in conn.execute("select pid from public.broker_test_runs where key = %s order by id", [key])]


def settle_message(max_retries: int) -> Message[None]:
    return Message(
        queue_name="cli_settle",
        actor_name="settle_slowly",
        args=("job",),
        kwargs={},
        options={"max_retries": max_retries, "min_backoff": 10, "max_backoff": 10},
    )


def freeze_holder_until_another_runs_it(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection, tmp_path: Path, *, outcome: str, max_retries: int
) -> tuple[subprocess.Popen[bytes], str]:
    """Worker A starts the job and is frozen past its lease; worker B takes the job over; A resumes and settles it.

    Returns worker B's command and the job's message id, once A has settled its copy and exited. B's run goes on
    until the test lets it finish (:func:`let_the_successor_finish`), however long A took on a loaded machine.
    """
    # Given worker A running the job, frozen (SIGSTOP) until its lease lapsed and worker B started the job too
    holder = start_cli(
        "--queues", "cli_settle", "--processes", "1", "--threads", "1",
        env={"BROKER_TEST_VT_S": VT_S, "BROKER_TEST_SLEEP_S": "1", "BROKER_TEST_OUTCOME": outcome},
    )  # fmt: skip
    message = broker.enqueue(settle_message(max_retries))
    wait_until(lambda: len(runs(conn, "start:job")) == 1, timeout_s=STARTUP_S, what="worker A to start the job")
    [holder_pid] = runs(conn, "start:job")
    os.kill(holder_pid, signal.SIGSTOP)
    successor = start_cli(
        "--queues", "cli_settle", "--processes", "1", "--threads", "1",
        env={"BROKER_TEST_VT_S": VT_S, "BROKER_TEST_GO_KEY": SUCCESSOR_GO},
    )  # fmt: skip
    try:
        wait_until(lambda: len(runs(conn, "start:job")) == 2, timeout_s=STARTUP_S, what="worker B to take the job over")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker B logged:\n{cli_log(tmp_path, 2)[-3000:]}") from exc
    finally:
        os.kill(holder_pid, signal.SIGCONT)

    # When A resumes, finishes its run and settles it (a graceful stop flushes whatever it still had to settle)
    wait_until(
        lambda: holder_pid in runs(conn, "job") or "fails in this process" in cli_log(tmp_path, 1),
        timeout_s=STARTUP_S,
        what="worker A to finish its run",
    )
    holder.send_signal(signal.SIGTERM)
    holder.wait(timeout=30)
    return successor, message.message_id


def let_the_successor_finish(conn: psycopg.Connection) -> None:
    conn.execute("insert into public.broker_test_runs (key, pid) values (%s, 0)", [SUCCESSOR_GO])


def assert_stale_settlement_logged_once(tmp_path: Path, message_id: str) -> None:
    """Worker A's log says once, at warning and with the message id, that its settlement changed nothing."""
    holder_log = cli_log(tmp_path, 1)
    stale = [line for line in holder_log.splitlines() if "no longer held" in line]
    assert len(stale) == 1, holder_log[-3000:]
    assert "WARNING" in stale[0] and message_id in stale[0], stale[0]


def test_a_frozen_holders_late_ack_leaves_the_copy_another_worker_runs(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection, tmp_path: Path
) -> None:
    successor, message_id = freeze_holder_until_another_runs_it(
        broker, start_cli, conn, tmp_path, outcome="ok", max_retries=0
    )

    # When worker B dies before finishing its copy
    os.killpg(successor.pid, signal.SIGKILL)
    successor.wait(timeout=10)

    # Then the message was still there: a third worker runs it to the end
    start_cli(
        "--queues", "cli_settle", "--processes", "1", "--threads", "1",
        env={"BROKER_TEST_VT_S": VT_S, "BROKER_TEST_SLEEP_S": "0"},
    )  # fmt: skip
    wait_until(lambda: len(runs(conn, "job")) == 2, timeout_s=STARTUP_S, what="a third worker to finish the job")
    broker.join("cli_settle", timeout=10_000)
    assert_stale_settlement_logged_once(tmp_path, message_id)


@pytest.mark.parametrize("max_retries", [1, 0], ids=["a retry", "a dead letter"])
def test_a_frozen_holders_late_failure_enqueues_and_dead_letters_nothing(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection, tmp_path: Path, max_retries: int
) -> None:
    _, message_id = freeze_holder_until_another_runs_it(
        broker, start_cli, conn, tmp_path, outcome="raise", max_retries=max_retries
    )

    # When worker B finishes its copy and the queue drains
    let_the_successor_finish(conn)
    wait_until(lambda: len(runs(conn, "job")) == 1, timeout_s=STARTUP_S, what="worker B to finish the job")
    broker.join("cli_settle", timeout=15_000)

    # Then A's failure, reported after it lost the lease, was neither retried (the job ran twice: A's run and
    # B's, never a third time) nor dead-lettered
    assert len(runs(conn, "start:job")) == 2
    assert broker.count_dead_letters("cli_settle") == 0
    assert_stale_settlement_logged_once(tmp_path, message_id)


def test_an_envelope_with_an_overflowing_timestamp_dead_letters_only_itself(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given an envelope whose message_timestamp is valid JSON but no float (a 400-digit number with a fraction),
    # queued ahead of healthy messages, so that one fetch takes them together
    timestamp = "9" * 400 + ".5"
    conn.execute("select pgmq.create('cli_fast')")
    conn.execute(
        'select pgmq.send(\'cli_fast\', (\'{"actor_name": "record", "args": ["huge"], "kwargs": {},'
        ' "options": {}, "message_id": "m-huge", "message_timestamp": \' || %s || \'}\')::jsonb)',
        [timestamp],
    )
    broker.enqueue_many(
        [Message(queue_name="cli_fast", actor_name="record", args=(f"ok{i}",), kwargs={}, options={}) for i in range(3)]
    )

    # When a worker fetches them
    start_cli("--queues", "cli_fast", "--processes", "1", "--threads", "2")

    # Then the healthy messages run, and only the bad row is dead-lettered, with its reason
    wait_until(
        lambda: all(runs(conn, f"ok{i}") for i in range(3)), timeout_s=STARTUP_S, what="the healthy messages to run"
    )
    wait_until(lambda: broker.count_dead_letters("cli_fast") == 1, timeout_s=10, what="one dead letter")
    [letter] = broker.dead_letters("cli_fast")
    assert (letter.reason, letter.error_type) == ("undecodable", "OverflowError")
    assert letter.error_message
    broker.join("cli_fast", timeout=10_000)
    assert runs(conn, "huge") == []


def test_a_job_that_kills_its_worker_costs_the_messages_prefetched_with_it_nothing(
    broker: PGMQBroker, start_cli: StartCli, conn: psycopg.Connection
) -> None:
    # Given a job that kills its worker process, queued ahead of a healthy one, and one worker thread (a
    # prefetch of two: the healthy message is buffered while the crashing one runs)
    broker.enqueue_many(
        [
            Message(queue_name="cli_crash", actor_name="record_or_crash", args=(key,), kwargs={}, options={})
            for key in ("crash", "healthy")
        ]
    )

    # When workers keep being started, each killed by the crashing job, until the queue is empty
    def drained() -> bool:
        metrics = broker.metrics("cli_crash")
        return metrics.queued + metrics.in_flight == 0

    for _ in range(6):
        worker = start_cli(
            "--queues", "cli_crash", "--processes", "1", "--threads", "1",
            env={"BROKER_TEST_VT_S": VT_S, "BROKER_TEST_MAX_DELIVERIES": "2"},
        )  # fmt: skip
        wait_until(
            lambda w=worker: w.poll() is not None or drained(),
            timeout_s=STARTUP_S,
            what="the worker to crash or the queue to drain",
        )
        if drained():
            break

    # Then the crashing job is dead-lettered after max_deliveries runs, and the healthy one ran
    assert runs(conn, "healthy"), f"dead letters: {broker.dead_letters('cli_crash')}"
    [letter] = broker.dead_letters("cli_crash")
    assert (letter.reason, letter.message["args"]) == ("max_deliveries", ["crash"])
