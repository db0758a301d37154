"""PeriodicScheduler on a real PGMQBroker: in one process through Dramatiq's Worker, and across real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq import Worker
from dramatiq.middleware import CurrentMessage

from brokers import PGMQBroker
from brokers.periodic import SCHEDULE_OPTION, SLOT_OPTION, PeriodicScheduler
from brokers.queries import SCHEDULE_RENEW

from .test_periodic_worker_app import BOOTS_TABLE, TICKS_TABLE

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], Any], *, timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.02)
    return result


def schedule_row(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cursor.execute("select * from pgmq_broker.schedules where name = %s", [name]).fetchone()
    assert row is not None
    return row


# --- options and registration ---


def test_the_scheduler_refuses_a_lease_shorter_than_three_polls() -> None:
    with pytest.raises(ValueError, match=r"lease_ms=200 is shorter than three poll intervals \(300 ms\)"):
        PeriodicScheduler(poll_interval_ms=100, lease_ms=200)


def test_the_scheduler_takes_at_most_one_connection_source(db_url: str) -> None:
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(db_url, open=False)
    with pytest.raises(ValueError, match="at most one of conninfo=, pool= and database="):
        PeriodicScheduler(conninfo=db_url, pool=pool)


@pytest.mark.parametrize("prepare", [True, False], ids=["prepare=on", "prepare=off"])
def test_prepare_statements_false_keeps_the_schedulers_own_pool_free_of_prepared_statements(
    db_url: str, prepare: bool
) -> None:
    # Given a scheduler with a pool of its own, as behind a transaction-mode pooler when prepare is off
    scheduler = PeriodicScheduler(conninfo=db_url, prepare_statements=prepare)
    pool = scheduler.database.pool
    try:
        # When its connection renews leases more often than psycopg's prepare threshold
        with pool.connection() as conn:
            for _ in range(10):
                conn.execute(SCHEDULE_RENEW, {"names": ["none"], "tokens": [0]})
            threshold = conn.prepare_threshold
            row = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    finally:
        pool.close()
    # Then with prepare_statements=False nothing was prepared on the server (otherwise psycopg's default applies)
    assert row is not None
    assert (threshold, row[0] > 0) == ((5, True) if prepare else (None, False))


def test_an_actor_becomes_periodic_by_option_or_by_registration(make_broker: Callable[..., PGMQBroker]) -> None:
    broker = make_broker()
    scheduler = PeriodicScheduler()
    broker.add_middleware(scheduler)

    @dramatiq.actor(broker=broker, queue_name="periodic_opts", periodic_ms=5_000)
    def by_option() -> None: ...

    @dramatiq.actor(broker=broker, queue_name="periodic_opts")
    def by_registration() -> None: ...

    scheduler.register(by_registration, timedelta(minutes=1), name="every-minute")
    assert {name: s.interval_ms for name, s in scheduler.schedules.items()} == {
        "by_option": 5_000,
        "every-minute": 60_000,
    }
    with pytest.raises(ValueError, match="must be positive"):
        scheduler.register(by_registration, 0)


# --- in one process, through Dramatiq's Worker ---


@pytest.fixture
def ticking(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker]
) -> Callable[..., tuple[PGMQBroker, list[dict[str, Any]]]]:
    """Start a worker with one periodic actor that records its messages' options (and optionally works a while)."""

    def start(*, interval_ms: int, work_s: float = 0.0) -> tuple[PGMQBroker, list[dict[str, Any]]]:
        broker = make_broker()
        broker.add_middleware(CurrentMessage())
        broker.add_middleware(PeriodicScheduler(poll_interval_ms=50, lease_ms=2_000))
        ticks: list[dict[str, Any]] = []

        @dramatiq.actor(broker=broker, queue_name="periodic_inproc", periodic_ms=interval_ms)
        def tick() -> None:
            message = CurrentMessage.get_current_message()
            assert message is not None
            ticks.append(dict(message.options))
            time.sleep(work_s)

        make_worker(broker)
        return broker, ticks

    return start


def test_a_periodic_actor_ticks_once_per_slot(ticking: Callable[..., Any], conn: psycopg.Connection) -> None:
    # Given a worker with an actor ticking every 200 ms
    _, ticks = ticking(interval_ms=200)
    # When it has run a few ticks
    wait_until(lambda: len(ticks) >= 5, what="5 ticks")
    # Then each tick is for its own 200 ms slot, none is retried, and the schedule accounts for every slot
    slots = [tick[SLOT_OPTION] for tick in ticks]
    assert len(set(slots)) == len(slots)
    assert all(slot % 200 == 0 for slot in slots)
    assert all(tick["max_retries"] == 0 and tick[SCHEDULE_OPTION] == "tick" for tick in ticks)
    row = schedule_row(conn, "tick")
    spanned = (max(slots) - min(slots)) // 200 + 1
    assert spanned - len(slots) <= row["slots_missed"]


def test_a_worker_that_does_not_consume_the_periodic_queue_sends_no_ticks(
    make_broker: Callable[..., PGMQBroker], make_worker: Callable[..., Worker], conn: psycopg.Connection
) -> None:
    # Given a worker started for another queue only (as `dramatiq mod --queues other` would)
    broker = make_broker()
    broker.add_middleware(PeriodicScheduler(poll_interval_ms=50, lease_ms=2_000))

    @dramatiq.actor(broker=broker, queue_name="periodic_elsewhere", periodic_ms=100)
    def tick() -> None: ...

    @dramatiq.actor(broker=broker, queue_name="periodic_other")
    def other() -> None: ...

    make_worker(broker, queues={"periodic_other"})
    other.send()
    broker.join("periodic_other", timeout=10_000)

    # Then its schedule was never taken up here, so no tick can wait on the queue that nobody here drains
    assert conn.execute("select count(*) from pgmq_broker.schedules where name = 'tick'").fetchone() == (0,)
    metrics = broker.metrics("periodic_elsewhere")
    assert (metrics.queued, metrics.delayed, metrics.in_flight) == (0, 0, 0)


def test_a_tick_that_outlasts_its_interval_is_not_overlapped_and_missed_slots_are_not_replayed(
    ticking: Callable[..., Any], conn: psycopg.Connection
) -> None:
    # Given ticks every 100 ms that each work 350 ms, on a worker with two threads (so overlap would be possible)
    _, ticks = ticking(interval_ms=100, work_s=0.35)
    # When four ticks have run
    wait_until(lambda: len(ticks) >= 4, timeout_s=15, what="4 ticks")
    # Then they ran one after another, about 4 slots apart: skipped slots were counted, not sent later in a burst
    slots = [tick[SLOT_OPTION] for tick in ticks[:4]]
    assert all(later - earlier >= 300 for earlier, later in zip(slots, slots[1:], strict=False))
    row = schedule_row(conn, "tick")
    assert row["slots_missed"] >= 6
    assert row["ticks_sent"] <= len(ticks) + 1


def test_a_stale_tick_is_skipped_without_running_the_actor(
    ticking: Callable[..., Any], conn: psycopg.Connection
) -> None:
    # Given a running schedule
    broker, ticks = ticking(interval_ms=60_000)
    wait_until(lambda: len(ticks) >= 1, what="the first tick")
    # When a tick message of an older slot shows up (a redelivery, or one that waited in a backlog)
    actor = broker.get_actor("tick")
    broker.enqueue(actor.message_with_options(**{SCHEDULE_OPTION: "tick", SLOT_OPTION: 0, "max_retries": 0}))
    broker.join("periodic_inproc", timeout=10_000)
    # Then the actor did not run for it
    assert [tick[SLOT_OPTION] for tick in ticks] == [ticks[0][SLOT_OPTION]]
    assert schedule_row(conn, "tick")["state"] == "idle"


# --- across real worker processes ---


@pytest.fixture
def start_workers(db_url: str, conn: psycopg.Connection) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``dramatiq tests.brokers.test_periodic_worker_app`` processes; every one is ended afterwards."""
    conn.execute(TICKS_TABLE)
    conn.execute(BOOTS_TABLE)
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.brokers.test_periodic_worker_app",
                "--processes",
                "1",
                "--threads",
                "2",
            ],
            cwd=ROOT,
            env={**os.environ, "PERIODIC_TEST_DATABASE_URL": db_url, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def recorded_ticks(conn: psycopg.Connection) -> list[dict[str, Any]]:
    cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cursor.execute("select * from public.periodic_test_ticks order by id").fetchall()


def all_booted_at(conn: psycopg.Connection, count: int) -> datetime | None:
    """When the last of `count` worker processes had booted (database clock), or None while some are still booting."""
    row = conn.execute("select count(*), max(booted_at) from public.periodic_test_boots").fetchone()
    assert row is not None
    return row[1] if row[0] >= count else None


@pytest.mark.processes
@pytest.mark.slow
def test_three_worker_processes_send_exactly_one_tick_per_slot(
    start_workers: Callable[..., subprocess.Popen[bytes]], conn: psycopg.Connection
) -> None:
    # Given three worker processes that all know a periodic actor ticking every second, all up and scheduling
    interval_ms = 1_000
    for _ in range(3):
        start_workers(PERIODIC_TEST_INTERVAL_MS=str(interval_ms))
    all_up = wait_until(lambda: all_booted_at(conn, 3), timeout_s=30, what="three workers to boot")
    # (slots that began while some were still starting, with their CPU busy importing, are not counted)
    first_slot_ms = (int(all_up.timestamp() * 1000) // interval_ms + 1) * interval_ms

    # When they have run for ten slots
    def counted_slots() -> list[int]:
        return sorted(tick["slot_ms"] for tick in recorded_ticks(conn) if tick["slot_ms"] >= first_slot_ms)

    wait_until(lambda: len(counted_slots()) >= 10, timeout_s=30, what="10 ticks once all workers were up")

    # Then every slot got exactly one tick: no gap and no duplicate
    slots = counted_slots()
    assert slots == list(range(first_slot_ms, first_slot_ms + len(slots) * interval_ms, interval_ms))


@pytest.mark.processes
@pytest.mark.slow
def test_slow_ticks_never_overlap_across_processes(
    start_workers: Callable[..., subprocess.Popen[bytes]], conn: psycopg.Connection
) -> None:
    # Given three worker processes and ticks every 200 ms that each work 500 ms
    for _ in range(3):
        start_workers(PERIODIC_TEST_INTERVAL_MS="200", PERIODIC_TEST_TICK_MS="500")
    # When six ticks have finished
    wait_until(
        lambda: sum(1 for tick in recorded_ticks(conn) if tick["finished_at"]) >= 6, timeout_s=30, what="6 ticks"
    )
    ticks = [tick for tick in recorded_ticks(conn) if tick["finished_at"]][:6]
    # Then each started after the previous one finished, even when run by another process
    for earlier, later in zip(ticks, ticks[1:], strict=False):
        assert later["started_at"] >= earlier["finished_at"]
        assert later["slot_ms"] > earlier["slot_ms"]
    assert schedule_row(conn, "tick")["slots_missed"] >= 6


@pytest.mark.processes
@pytest.mark.slow
def test_a_killed_worker_delays_the_schedule_by_at_most_its_lease(
    start_workers: Callable[..., subprocess.Popen[bytes]], conn: psycopg.Connection
) -> None:
    # Given a worker whose first tick hangs (lease 1.5 s, ticks every 200 ms), and a second, healthy worker
    env = {"PERIODIC_TEST_INTERVAL_MS": "200", "PERIODIC_TEST_LEASE_MS": "1500", "PERIODIC_TEST_HANG_FIRST": "1"}
    first = start_workers(**env)
    wait_until(lambda: recorded_ticks(conn), timeout_s=20, what="the first tick")
    hung_pid = recorded_ticks(conn)[0]["pid"]
    start_workers(**env)
    # While the hung tick's process is alive it keeps its lease, so no other tick starts
    time.sleep(2)  # an observation window (longer than the lease), not synchronisation
    assert len(recorded_ticks(conn)) == 1
    # When that process is killed
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed_at: datetime = conn.execute("select clock_timestamp()").fetchone()[0]  # type: ignore[index]
    # Then the other worker resumes the schedule within the lease (plus a poll or two)
    wait_until(lambda: len(recorded_ticks(conn)) >= 2, timeout_s=10, what="a tick after the kill")
    resumed = recorded_ticks(conn)[1]
    assert resumed["pid"] != hung_pid
    assert resumed["started_at"] - killed_at <= timedelta(seconds=1.5 + 1.0)
    assert schedule_row(conn, "tick")["last_error"] is None
